"""Progress on stderr: the training core's callbacks drawn as a rich bar or as plain log lines.

A terminal gets a progress bar per stage with the stage's time left (and under ``run`` the
pipeline's); a pipe or a CI log gets one line per epoch, and inside an epoch a line at most
every ``$NETTAILOR_PROGRESS_SECONDS`` (30). Under torchrun only rank 0 reports.
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console

from .. import defaults
from ..errors import UsageError
from .output import err_console
from .render import duration as _duration

_now = time.monotonic  # the progress clock (a test replaces it)


class Reporter:
    """Training callbacks on stderr: a progress bar on a terminal, plain log lines otherwise.

    Both say where the stage is and how long it has left, and under ``run`` (which announces its
    stages with ``on_plan``) about how long the whole pipeline has left. Without a terminal (CI
    logs), a progress line comes at most every ``$NETTAILOR_PROGRESS_SECONDS`` (30) inside an epoch.
    """

    def __init__(self, quiet: bool = False, console: Console | None = None):
        from ..distributed import is_main

        self.quiet = quiet or not is_main()  # under torchrun, rank 0 alone prints
        self.console = console or err_console
        self.tty = not self.quiet and (self.console.is_terminal if console is not None else sys.stderr.isatty())
        self.interval = _progress_seconds()
        self.progress = None
        self.task_id = None
        self.plan: list[list] = []  # [stage, epochs] still to come
        self.stage: dict = {}  # the stage running: name, epochs, steps, steps to do and done, when it started

    def on_plan(self, stages):
        self.plan = [[name, epochs] for name, epochs in stages]

    def on_stage_start(self, stage, epochs, steps, start_epoch):
        self._advance_plan(stage, epochs - start_epoch)
        now = _now()
        self.stage = {"name": stage, "epochs": epochs, "steps": steps, "todo": (epochs - start_epoch) * steps,
                      "done": 0, "start": now, "last_line": now}
        self._log(f"{stage}: {epochs} epoch{'s' * (epochs != 1)} x {steps} step{'s' * (steps != 1)}"
                  + (f", resuming at epoch {start_epoch + 1}" if start_epoch else ""))
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            if self.progress is None:
                self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[eta]}"), console=self.console, transient=True)
                self.progress.start()
            self.task_id = self.progress.add_task(f"{stage} epoch {start_epoch + 1}/{epochs}", total=steps, eta="")

    def on_step(self, stage, epoch, step, steps):
        self.stage["done"] += 1
        if self.progress is not None:
            self.progress.update(self.task_id, completed=step + 1, eta=self._eta())
        elif not self.quiet and _now() - self.stage["last_line"] >= self.interval:
            self.stage["last_line"] = _now()
            self._log(f"{stage} epoch {epoch + 1}/{self.stage['epochs']}: step {step + 1}/{steps}; {self._eta()}")

    def on_epoch_end(self, stage, row):
        epochs = self.stage.get("epochs", row["epoch"])
        terms = " ".join(f"{k[6:]} {row[k]:.4f}" for k in row if k.startswith("train_") and k not in ("train_loss", "train_acc"))
        self._log(f"{stage} epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f} ({terms}) "
                  f"train_acc {row['train_acc']:.2f} val_acc {row['val_acc']:.2f} "
                  f"[{row['epoch_seconds']:.1f}s, {row['images_per_second']:.0f} img/s]")
        self.stage["last_line"] = _now()
        if self.progress is None:
            return
        if row["epoch"] < epochs:
            self.progress.reset(self.task_id, description=f"{stage} epoch {row['epoch'] + 1}/{epochs}",
                                eta=self._eta())
        else:  # the stage is done: no bar for an epoch that will not run
            self.progress.remove_task(self.task_id)
            self.task_id = None

    def on_message(self, message):
        self._log(message)

    def _advance_plan(self, stage, epochs):
        """Drop the planned stages before ``stage``; a K search candidate uses up its epochs of the search's."""
        name = stage.split("/")[0]
        names = [n for n, _ in self.plan]
        if name not in names:
            return
        del self.plan[:names.index(name)]
        if name == "search":
            self.plan[0][1] = max(self.plan[0][1] - epochs, 0)
        else:
            del self.plan[0]

    def _eta(self) -> str:
        """``stage 4m10s left, run about 21m05s left``: the steps to go at this stage's pace so far
        (evaluations included), and the planned epochs after it at this stage's seconds per epoch."""
        st = self.stage
        if not st.get("done"):
            return ""
        per_step = (_now() - st["start"]) / st["done"]
        left = per_step * (st["todo"] - st["done"])
        text = f"stage {_duration(left)} left"
        later = sum(epochs for _, epochs in self.plan)
        if later:
            text += f", run about {_duration(left + later * per_step * st['steps'])} left"
        return text

    def _log(self, message):
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.console.print(message, highlight=False)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _progress_seconds() -> float:
    """Seconds between progress lines without a terminal: ``$NETTAILOR_PROGRESS_SECONDS``, or the default."""
    text = os.environ.get("NETTAILOR_PROGRESS_SECONDS")
    if text is None:
        return defaults.PROGRESS_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"NETTAILOR_PROGRESS_SECONDS must be a number of seconds >= 0, got '{text}'; unset it for "
                         f"a line every {defaults.PROGRESS_SECONDS:g} s")
    return value


@contextmanager
def reporting() -> Iterator[Reporter]:
    """A :class:`Reporter` for one command, its bar closed however the command ends."""
    rep = Reporter()
    try:
        yield rep
    finally:
        rep.close()
