"""Where output goes: results on stdout, everything else on stderr.

stdout carries results only: with ``--json`` exactly one JSON document (the result, or
``{"error": ..., "exit_code": ...}``), else the rendered result (rich on a terminal, plain ASCII
on a pipe). Errors, warnings, progress and logs go to stderr.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable

import typer
from rich import box
from rich.console import Console
from rich.table import Table

err_console = Console(stderr=True, soft_wrap=True)  # an error is one line, never wrapped
_state = {"emitted": False}  # whether this command already wrote its JSON document


def stdout_console() -> Console:
    """Rich on a terminal; on a pipe or file plain ASCII, never wrapped (so ``grep`` finds whole lines)."""
    if sys.stdout.isatty():
        return Console(file=sys.stdout)
    return Console(file=sys.stdout, width=10_000, no_color=True, highlight=False, emoji=False, soft_wrap=True)


def table(title: str) -> Table:
    """A table for stdout: heavy-headed on a terminal, ASCII on a pipe."""
    return Table(title=title, title_justify="left", box=box.HEAVY_HEAD if sys.stdout.isatty() else box.ASCII)


def warn(message: str) -> None:
    err_console.print(f"warning: {message}", highlight=False, markup=False)


def begin() -> None:
    """A command starts: no JSON document written yet."""
    _state["emitted"] = False


def emit(result: dict, as_json: bool, render: Callable[[dict], None] | None = None) -> None:
    """The command's result: one JSON document, or ``render(result)``; under torchrun on rank 0 only."""
    if not _is_main():
        return
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        _state["emitted"] = True
    elif render is not None:
        render(result)


def under_torchrun() -> bool:
    """Launched by torchrun with more than one process (read from the environment: torch is not imported)."""
    return os.environ.get("WORLD_SIZE", "1") != "1"


def _is_main() -> bool:
    """Rank 0 under torchrun; always outside it (without importing torch, which a usage error need not wait for)."""
    if not under_torchrun():
        return True
    from ..distributed import is_main

    return is_main()


def fail(message: str, code: int, json_out: bool):
    """One ``error:`` line on stderr (and the JSON error document on stdout with --json), then exit ``code``."""
    err_console.print(f"error: {message}", highlight=False, markup=False, soft_wrap=True)
    if json_out and not _state["emitted"] and _is_main():  # exit 7 follows its result document: no second one
        sys.stdout.write(json.dumps({"error": message, "exit_code": code}) + "\n")
        sys.stdout.flush()
    raise typer.Exit(code)
