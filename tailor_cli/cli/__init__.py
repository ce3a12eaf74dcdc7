"""The `nettailor` command line: parse, validate, call the core, render.

stdout carries results only (``--json``: exactly one JSON document); progress and logs go to
stderr (a rich progress bar on a terminal, plain lines otherwise). Every failure is one
``error:`` line and a documented exit code (``tailor_cli.errors``).

Modules, in import order: ``output`` (stdout and stderr, the JSON document, the error line),
``render`` (results as tables and lines), ``progress`` (the training callbacks on stderr),
``options`` (the shared options, ``-c/--config``, option values -> the core's options), ``app``
(the Typer app, the error boundary, the entry point), ``commands`` (the stages and the tools on
finished runs, one command each), ``pipeline`` (``run``: every stage in one command).
"""
from __future__ import annotations

from . import commands, pipeline  # noqa: F401  (register the commands on the app)
from .app import app, invoke, main

__all__ = ["app", "invoke", "main"]
