"""Errors that the CLI turns into a one-line message and a documented exit code.

The core raises these; it never prints and never calls ``sys.exit``. Any other
exception escaping to the CLI is a bug (exit 1, traceback only with ``--debug``).
"""
from __future__ import annotations

# Exit codes, documented in README.md and in `nettailor --help`.
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: unexpected exception
EXIT_USAGE = 2  # bad command-line arguments (also Typer/click's own code)
EXIT_DATA = 3  # dataset missing, empty, unreadable, wrong classes
EXIT_MODEL = 4  # unknown/unsupported backbone, weights that do not fit
EXIT_RUN = 5  # run directory missing, wrong stage, exists, corrupt files, in use by another process
EXIT_TRAINING = 6  # NaN/inf loss, out of memory
EXIT_TOLERANCE = 7  # chosen network misses the accuracy tolerance (`run`, `prune --auto`)
EXIT_EXPORT = 8  # export directory holds another backbone, integrity check failed
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class TailorError(Exception):
    """Base class: ``str(err)`` is the one-line message shown to the user."""

    exit_code = EXIT_INTERNAL


class UsageError(TailorError):
    exit_code = EXIT_USAGE


class DataError(TailorError):
    exit_code = EXIT_DATA


class ModelError(TailorError):
    exit_code = EXIT_MODEL


class RunError(TailorError):
    exit_code = EXIT_RUN


class TrainingError(TailorError):
    exit_code = EXIT_TRAINING


class ToleranceError(TailorError):
    exit_code = EXIT_TOLERANCE


class ExportError(TailorError):
    exit_code = EXIT_EXPORT


class Interrupted(TailorError):
    """Raised by the training loop after it saved a checkpoint on SIGINT/SIGTERM.

    ``where``: what stopped, without the advice (``"finetune interrupted in epoch 2"``), for a command
    whose way to continue is not the stage's own.
    """

    def __init__(self, message: str, exit_code: int = EXIT_SIGINT, where: str | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.where = where or message
