"""The learning-rate schedule of every training stage, set per optimiser step.

``cosine`` (the default): a linear warm-up over the first ``warmup_epochs`` (the rate of update
``s`` is ``lr * (s + 1) / W`` for ``W`` warm-up updates), then a cosine decay from ``lr`` to 0 at
the last update; timm's ``CosineLRScheduler`` with ``warmup_prefix=True`` and ``lr_min=0`` draws
the same curve. Pretrained weights on a small task keep learning to the end of the budget, and
the last epochs, at a small rate, settle the network (docs/method.md, "Training recipe").

``step``: the authors' recipe: ``lr`` times 0.1 every ``lr_step`` epochs (after the warm-up, if
one is asked for). With ``--lr-step`` at 40% of the epochs it is the paper's code's schedule.

A parameter group may start slow: with ``slow_epochs`` and ``slow_factor`` set, its rate is
``slow_factor`` times the curve for its first ``slow_epochs`` epochs, then the curve itself. The
tailor stage starts its attention logits slow (``--attention-slow-epochs``): the blocks it keeps are
not decided by the first epochs, while the proxies still learn their way to the teacher
(docs/method.md, "Measured", session 18).

The schedule is a pure function of the update count, held by a ``LambdaLR`` whose state (the
update count) is saved in every training checkpoint: a resumed stage continues on the same curve.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch

SCHEDULES = ("cosine", "step")


def lr_factor(update: int, *, schedule: str, total: int, per_epoch: int, warmup: int, lr_step: int) -> float:
    """The multiplier of the base rate for update ``update`` (0-based) of ``total`` updates.

    ``per_epoch``: updates per epoch; ``warmup``: warm-up updates; ``lr_step``: epochs between
    x0.1 decays (``step`` only).
    """
    if update < warmup:
        return (update + 1) / warmup
    if schedule == "step":
        return 0.1 ** ((update // max(1, per_epoch)) // max(1, lr_step))
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    progress = min(1.0, (update - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def slow_start(update: int, *, factor: Callable[[int], float], scale: float, until: int) -> float:
    """``factor`` scaled by ``scale`` for the updates before ``until``: a parameter group that starts slow."""
    return scale * factor(update) if update < until else factor(update)


def make_scheduler(opt: torch.optim.Optimizer, *, schedule: str, epochs: int, per_epoch: int,
                   warmup_epochs: float, lr_step: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler to step after every optimiser update; the warm-up is at most the whole training.

    Groups with ``slow_epochs`` > 0 start slow (:func:`slow_start`, ``slow_factor`` times the curve).
    """
    total = max(1, epochs * per_epoch)
    warmup = min(total, round(warmup_epochs * per_epoch))
    factor = partial(lr_factor, schedule=schedule, total=total, per_epoch=per_epoch, warmup=warmup, lr_step=lr_step)
    factors: list[Callable[[int], float]] = [
        partial(slow_start, factor=factor, scale=float(group["slow_factor"]), until=round(group["slow_epochs"] * per_epoch))
        if group.get("slow_epochs") else factor
        for group in opt.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(opt, factors)
