"""The Typer app and its error boundary: every failure becomes one ``error:`` line and an exit code.

A command's body runs inside :func:`execute`: a :class:`~tailor_cli.errors.TailorError` from the
core becomes its message and documented exit code, anything else exit 1 ("internal error", the
traceback only with ``--debug``). :func:`invoke` does the same for click's own parsing errors.
"""
from __future__ import annotations

import re
import sys
import traceback
from typing import Annotated, Any, Callable

import typer
from typer.core import TyperCommand

from .. import __version__
from ..errors import (
    EXIT_DATA,
    EXIT_EXPORT,
    EXIT_INTERNAL,
    EXIT_MODEL,
    EXIT_RUN,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_TOLERANCE,
    EXIT_TRAINING,
    EXIT_USAGE,
    TailorError,
    ToleranceError,
)
from .output import begin, err_console, fail, under_torchrun

EXIT_CODES_HELP = (
    f"Exit codes: 0 ok; {EXIT_INTERNAL} internal error (a bug; rerun with --debug); {EXIT_USAGE} bad arguments; "
    f"{EXIT_DATA} data error; {EXIT_MODEL} backbone/weights error; {EXIT_RUN} run directory error; "
    f"{EXIT_TRAINING} training failed (NaN, out of memory); {EXIT_TOLERANCE} accuracy tolerance missed; "
    f"{EXIT_EXPORT} export/adapter error; {EXIT_SIGINT} interrupted (Ctrl-C); {EXIT_SIGTERM} terminated (SIGTERM)."
)

class Command(TyperCommand):
    """A command whose usage line and help write arguments as the README does (``RUN``, ``EXPORT_DIR``,
    ``IMAGES...``), not as typer's ``{run}`` or ``<list[Path]>``."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [re.sub(r"\{([^{}]+)\}", lambda m: m.group(1).upper(), piece)
                for piece in super().collect_usage_pieces(ctx)]

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                name = (param.metavar or (param.name or "").upper()) + ("..." if param.nargs != 1 else "")
                args.append((name, record[1]))
            else:
                opts.append((re.sub(r"<list\[(\w+)\]>", lambda m: m.group(1).upper() + "...", record[0]),
                             record[1]))
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class _App(typer.Typer):
    """Every command is a :class:`Command`."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)


app = _App(
    name="nettailor",
    help="Tailor pretrained CNNs to new tasks by changing the architecture, not just the weights "
    "(NetTailor, CVPR 2019).\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"nettailor {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
):
    """Tailor pretrained CNNs to new tasks by changing the architecture, not just the weights."""


def execute(debug: bool, body: Callable[[], None], json_out: bool = False) -> None:
    """Run a command body: TailorError -> one line + its exit code; anything else -> exit 1.

    With ``--json`` the error is also the one JSON document on stdout: ``{"error": ..., "exit_code": ...}``.
    """
    begin()
    try:
        body()
    except TailorError as err:
        if debug:
            traceback.print_exc()
        fail(f"{_rank_prefix()}{err}", err.exit_code, json_out)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_SIGINT, json_out)
    except Exception as err:  # a bug, or an environment problem we did not anticipate
        if debug:
            traceback.print_exc()
        msg = str(err).splitlines()[0][:200] if str(err) else ""
        if "out of memory" in msg.lower():
            fail(f"out of memory ({msg}); try a smaller --batch-size", EXIT_TRAINING, json_out)
        fail(f"internal error: {type(err).__name__}: {msg} (rerun with --debug for the traceback)", EXIT_INTERNAL,
             json_out)


def fail_on_tolerance(result: dict) -> None:
    """``run`` and ``prune --auto``: a chosen network that missed the tolerance is exit 7, after its result."""
    if result.get("error"):
        raise ToleranceError(result["error"])


def _rank_prefix() -> str:
    from ..distributed import info

    return f"[rank {info().rank}] " if info().rank else ""


def main() -> None:
    """Console-script entry point (also under torchrun: the process group comes from the environment).

    Outside torchrun nothing here imports torch, so ``--help``, ``--version`` and a mistyped option
    answer at once; the commands import what they need.
    """
    if not under_torchrun():
        raise SystemExit(invoke(sys.argv[1:]))
    from ..distributed import cleanup, setup

    try:
        setup()
    except Exception as err:  # a rendezvous that fails is an environment problem, not a bug
        print(f"error: could not start the distributed process group ({err}); check the torchrun arguments",
              file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    try:
        code = invoke(sys.argv[1:])
    finally:
        cleanup()
    raise SystemExit(code)


def invoke(argv: list[str]) -> int:
    """Run the app; click's own parsing errors become one ``error:`` line and exit 2, like ours."""
    try:
        code = app(args=argv, prog_name="nettailor", standalone_mode=False)
    except typer.Abort:
        err_console.print("error: interrupted", highlight=False, markup=False)
        return EXIT_SIGINT
    except Exception as exc:
        # click's exceptions (typer vendors click in recent versions, so match by shape, not class)
        err: Any = exc
        if not (hasattr(err, "format_message") and isinstance(getattr(err, "exit_code", None), int)):
            raise
        if type(err).__name__ == "NoArgsIsHelpError":  # `nettailor` alone prints the help
            err.show()
            return err.exit_code
        ctx = getattr(err, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        try:
            fail(err.format_message() + hint, EXIT_USAGE if err.exit_code == 2 else err.exit_code, "--json" in argv)
        except typer.Exit as exit_:
            return exit_.exit_code
    return code if isinstance(code, int) else 0
