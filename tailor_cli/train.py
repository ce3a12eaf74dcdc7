"""One readable training loop for every stage (teacher, tailor, finetune).

A stage is: an *objective* (images, labels -> loss, logits, named terms; see
:mod:`tailor_cli.objectives`), the parameters to train, loaders, and a stage
directory. Each epoch ends with an evaluation, a line in ``metrics.jsonl`` and an
atomic checkpoint (:mod:`tailor_cli.checkpoint`), so a killed run loses at most
the epoch in progress and ``resume=True`` continues exactly
(each epoch re-seeds the RNGs from ``seed + epoch``, so a resumed epoch draws
the same shuffling and augmentation as an uninterrupted one).

The loop never prints: it reports through :class:`Callbacks`.
"""
from __future__ import annotations

import contextlib
import json
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import defaults
from .checkpoint import (
    append_jsonl,
    load_checkpoint,
    load_model_state,
    model_state,
    read_jsonl,
    read_safetensors,
    save_checkpoint,
    write_safetensors,
)
from .distributed import all_reduce_sum, barrier, broadcast_buffers, is_main
from .errors import EXIT_SIGINT, EXIT_SIGTERM, Interrupted, TrainingError, UsageError
from .objectives import Objective
from .runs import CHECKPOINT
from .schedule import make_scheduler

METRICS = "metrics.jsonl"
BEST = "best.safetensors"  # weights of the best validation epoch so far (keep="best")


@dataclass
class TrainConfig:
    epochs: int
    lr: float
    lr_step: int  # epochs between x0.1 decays (schedule "step")
    schedule: str = defaults.SCHEDULE  # "cosine" or "step" (tailor_cli.schedule)
    warmup_epochs: float = 0.0  # linear warm-up before either schedule
    label_smoothing: float = 0.0  # of the training cross-entropy (objectives); evaluation is plain CE
    momentum: float = defaults.MOMENTUM
    nesterov: bool = defaults.NESTEROV
    weight_decay: float = defaults.WEIGHT_DECAY  # a parameter group may set its own (0 for attention logits)
    seed: int = 0
    amp: bool = False
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    check_every: int = 1  # steps between finiteness checks (a host sync); 1 on CPU
    clip_grad: float | None = None  # max global L2 norm of the gradients per step (None: no clipping)


class Callbacks:
    """Override what you need; the CLI draws progress bars or log lines from these."""

    def on_stage_start(self, stage: str, epochs: int, steps: int, start_epoch: int) -> None: ...
    def on_step(self, stage: str, epoch: int, step: int, steps: int) -> None: ...
    def on_epoch_end(self, stage: str, row: dict) -> None: ...
    def on_message(self, message: str) -> None: ...
    def on_plan(self, stages: list[tuple[str, int]]) -> None:
        """The stages to come and their epochs, in order (the K search's an estimate): for an ETA of a pipeline."""


# --------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    """Seed every RNG that augmentation may draw from (timm's transforms use ``random``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

def resolve_device(name: str) -> torch.device:
    """``auto``: cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"unknown --device '{name}'; use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} requested but CUDA is not available; use --device cpu (or auto)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {name} requested but MPS is not available; use --device cpu (or auto)")
    return device


def make_optimizer(groups: list[dict], cfg: TrainConfig,
                   steps_per_epoch: int = 1) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD with (Nesterov) momentum; ``groups`` may set their own weight decay (0 for attention logits).

    The scheduler is stepped after every update (:mod:`tailor_cli.schedule`).
    """
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                          weight_decay=cfg.weight_decay)
    sched = make_scheduler(opt, schedule=cfg.schedule, epochs=cfg.epochs, per_epoch=steps_per_epoch,
                           warmup_epochs=cfg.warmup_epochs, lr_step=cfg.lr_step)
    return opt, sched


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device, *, amp_ctx=contextlib.nullcontext, channels_last=False) -> dict:
    """Top-1 accuracy (%) and mean CE over a whole loader; sums stay on the device until the end."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    loss_sum = torch.zeros((), device=device)
    count = 0
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with amp_ctx():
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        count += labels.numel()
    model.train(was_training)
    totals = all_reduce_sum(torch.stack([correct.double(), loss_sum.double(),
                                         torch.tensor(float(count), device=device, dtype=torch.float64)]))
    n_right, loss_total, n = totals[0].item(), totals[1].item(), int(totals[2].item())
    if n == 0:
        return {"acc": float("nan"), "loss": float("nan"), "n": 0}
    return {"acc": 100.0 * n_right / n, "loss": loss_total / n, "n": n}


@torch.inference_mode()
def correct_mask(model: nn.Module, loader, device: torch.device, *, amp_ctx=contextlib.nullcontext,
                 channels_last=False) -> torch.Tensor:
    """Per item of ``loader`` (in its order): was the top-1 prediction right? A bool tensor on the CPU.

    For paired comparisons of two networks on the same images (:mod:`tailor_cli.selection`);
    the loader must not shuffle and must cover the whole split (no sharding).
    """
    was_training = model.training
    model.eval()
    out = []
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with amp_ctx():
            logits = model(images)
        out.append((logits.argmax(1).cpu() == labels))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


class StopFlag:
    """SIGINT/SIGTERM set a flag checked between steps; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def autocast_context(cfg: TrainConfig, device: torch.device) -> Callable:
    """A factory of the mixed-precision context the config asks for (``nullcontext`` without AMP)."""
    if not (cfg.amp and device.type in ("cuda", "cpu", "mps")):
        return contextlib.nullcontext
    dtype = getattr(torch, cfg.amp_dtype)
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for float16 autocast (its small gradients underflow); None for bfloat16 and float32."""
    if cfg.amp and cfg.amp_dtype == "float16" and device.type in ("cuda", "cpu", "mps"):
        return torch.amp.GradScaler(device.type)
    return None


# --------------------------------------------------------------------------- the loop
def fit(
    *,
    stage: str,
    stage_dir: Path,
    model: nn.Module,
    objective: Objective,
    param_groups: list[dict],
    train_loader,
    val_loader,
    device: torch.device,
    cfg: TrainConfig,
    resume: bool = False,
    callbacks: Callbacks | None = None,
    checkpoint_extra: dict | None = None,
    train_mode: Callable[[], None] | None = None,
    keep: str = "last",
    frozen: Collection[str] = (),
) -> dict:
    """Train ``model`` for ``cfg.epochs`` epochs; return the metrics row of the epoch kept.

    ``keep="last"`` leaves the model as the last epoch made it. ``keep="best"`` ends with the
    weights of the epoch with the highest validation accuracy (ties: the lower validation loss,
    then the later epoch), saved to ``stage_dir/best.safetensors`` whenever one is beaten; the
    returned row is that epoch's, with ``kept_epoch`` set. Only validation data decides.
    ``train_mode`` puts the model(s) into training mode (default ``model.train()``;
    the tailor stage keeps its teacher in eval mode). ``frozen``: state-dict keys left out of the
    checkpoint and the best-epoch copy (a student's shared tensors, which the run stores once).
    """
    if keep not in ("last", "best"):
        raise ValueError(f"keep must be 'last' or 'best', got {keep!r}")
    cb = callbacks or Callbacks()
    stage_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = stage_dir / CHECKPOINT, stage_dir / METRICS
    opt, sched = make_optimizer(param_groups, cfg, steps_per_epoch=len(train_loader))
    scaler = make_grad_scaler(cfg, device)
    best_path = stage_dir / BEST
    start_epoch, best, best_key, best_epoch = 0, float("-inf"), None, 0
    if resume and ckpt_path.exists():
        meta = load_checkpoint(ckpt_path, model, opt, sched, device, scaler, frozen)
        start_epoch, best = int(meta["epoch"]), float(meta["best_acc"])
        best_epoch = int(meta.get("best_epoch", start_epoch))
        rows = [r for r in read_jsonl(metrics_path) if r["epoch"] <= start_epoch]
        if is_main():
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        barrier()
        kept = next((r for r in rows if r["epoch"] == best_epoch), None)
        best_key = _rank(kept) if kept is not None else None
        cb.on_message(f"{stage}: resuming after epoch {start_epoch}/{cfg.epochs} from {ckpt_path}")
    elif is_main():
        metrics_path.unlink(missing_ok=True)
        best_path.unlink(missing_ok=True)

    amp_ctx = autocast_context(cfg, device)
    steps = len(train_loader)
    cb.on_stage_start(stage, cfg.epochs, steps, start_epoch)
    row: dict = {}
    with StopFlag() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            seed_everything(cfg.seed + epoch)  # augmentation in the main process (torch, random, numpy)
            if getattr(train_loader, "generator", None) is not None:
                train_loader.generator.manual_seed(cfg.seed + epoch)  # shuffling and worker seeds
            sampler = getattr(train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            (train_mode or model.train)()
            lr = opt.param_groups[0]["lr"]  # the rate of the epoch's first update
            named_lr = {f"{g['name']}_lr": g["lr"] for g in opt.param_groups if "name" in g}  # e.g. attention_lr
            sums = torch.zeros(len(objective.terms) + 2, device=device)  # terms..., loss, correct
            grads = torch.zeros(2, device=device)  # largest gradient norm, steps clipped
            seen = 0
            t0 = time.perf_counter()
            for step, (images, labels) in enumerate(train_loader):
                images = images.to(device, non_blocking=True)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                labels = labels.to(device, non_blocking=True)
                with amp_ctx():
                    loss, logits, terms = objective(images, labels)
                opt.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    grad_norm = _clip_gradients(opt, cfg.clip_grad)
                    opt.step()
                else:  # float16: a step whose gradients overflow is skipped and the scale lowered
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)  # clip (and measure) the true gradients
                    grad_norm = _clip_gradients(opt, cfg.clip_grad)
                    scaler.step(opt)
                    scaler.update()
                sched.step()  # per update: warm-up and cosine are curves over steps
                with torch.no_grad():
                    values = torch.stack([terms[t].detach().float() for t in objective.terms] + [loss.detach().float()])
                    sums[:-1] += values * labels.numel()
                    sums[-1] += (logits.detach().argmax(1) == labels).sum()
                    grads[0] = torch.where(torch.isfinite(grad_norm), torch.maximum(grads[0], grad_norm), grads[0])
                    if cfg.clip_grad is not None:
                        grads[1] += (grad_norm > cfg.clip_grad).float()
                seen += labels.numel()
                if (step + 1) % cfg.check_every == 0 or step + 1 == steps:
                    _check_finite(values, objective.terms, stage, epoch, step)
                cb.on_step(stage, epoch, step, steps)
                if stop.signum is not None:
                    break
            if stop.signum is not None:
                code = EXIT_SIGTERM if stop.signum == signal.SIGTERM else EXIT_SIGINT
                where = f"{stage} interrupted in epoch {epoch + 1}"
                if ckpt_path.exists():
                    raise Interrupted(f"{where}; its checkpoint after epoch {epoch} is kept ({ckpt_path}). Rerun the "
                                      "same command with --resume to continue", exit_code=code, where=where)
                raise Interrupted(f"{where}, before its first checkpoint: nothing of it was saved. Rerun the same "
                                  "command to start it again (`nettailor run`: with --resume, to keep the stages "
                                  "already done)", exit_code=code, where=where)
            train_time = time.perf_counter() - t0
            broadcast_buffers(model)  # every rank evaluates (and rank 0 saves) the same BN statistics
            val = evaluate(model, val_loader, device, amp_ctx=amp_ctx, channels_last=cfg.channels_last)
            seen_all = all_reduce_sum(torch.tensor(float(seen), device=device))
            host = (all_reduce_sum(sums) / seen_all.clamp(min=1)).tolist()
            row = {"epoch": epoch + 1, "lr": lr, **named_lr}
            row.update({f"train_{t}": host[i] for i, t in enumerate(objective.terms)})
            row.update({
                "train_loss": host[-2], "train_acc": 100.0 * host[-1],
                "val_acc": val["acc"], "val_loss": val["loss"],
                "epoch_seconds": round(train_time, 3), "images_per_second": round(seen / max(train_time, 1e-9), 1),
                "max_grad_norm": grads[0].item(), "clipped_steps": int(grads[1].item()),
            })
            record = getattr(objective, "epoch_record", None)  # the student's attention, for one
            if record is not None:
                row.update(record())
            best = max(best, val["acc"])
            if best_key is None or _rank(row) >= best_key:
                best_key, best_epoch = _rank(row), epoch + 1
                if keep == "best" and is_main():
                    write_safetensors(best_path, model_state(model, frozen), {"epoch": epoch + 1})
            # checkpoint first: a metrics line never names an epoch whose checkpoint is missing
            save_checkpoint(ckpt_path, model, opt, sched, epoch=epoch + 1, best=best, best_epoch=best_epoch,
                            extra=checkpoint_extra or {}, scaler=scaler, frozen=frozen)
            append_jsonl(metrics_path, row)
            cb.on_epoch_end(stage, row)
    barrier()
    rows = read_jsonl(metrics_path)
    if not row:  # nothing left to do (resumed a finished stage)
        row = rows[-1] if rows else {"epoch": start_epoch}
    if keep == "best" and best_epoch and best_epoch != row.get("epoch"):
        tensors, _ = read_safetensors(best_path, what="best-epoch weights", device=str(device) if device.type != "mps" else "cpu")
        load_model_state(model, tensors, frozen, what=f"best-epoch weights '{best_path}'")
        row = next(r for r in rows if r["epoch"] == best_epoch)
    row = dict(row)
    row["epochs_trained"] = max([r["epoch"] for r in rows] + [int(row.get("epoch", 0))])
    row["kept_epoch"] = row.get("epoch")
    row["best_val_acc"] = best
    return row


def _clip_gradients(opt: torch.optim.Optimizer, max_norm: float | None) -> torch.Tensor:
    """The global L2 norm of the weights' gradients, scaled down to ``max_norm`` if above.

    A bounded step keeps an exploding loss (a teacher term in the thousands on a badly scaled
    task, a bad batch) from throwing the weights to infinity. Parameter groups marked
    ``"clip": False`` (the student's attention logits) are neither measured nor clipped: scaled
    together with the proxies' far larger gradients, the architecture would barely move.
    """
    params = [p for g in opt.param_groups if g.get("clip", True) for p in g["params"] if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm is None:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach()) for p in params]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def _rank(row: dict) -> tuple[float, float, int]:
    """Order of epochs for keep="best": higher val accuracy, then lower val loss, then later."""
    return (row["val_acc"], -row["val_loss"], row["epoch"])


def _check_finite(values: torch.Tensor, names: tuple[str, ...], stage: str, epoch: int, step: int) -> None:
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        which = [n for n, b in zip(list(names) + ["loss"], bad.tolist()) if b]
        raise TrainingError(
            f"{stage}: non-finite loss at epoch {epoch + 1}, step {step + 1} (term: {', '.join(which)}); "
            "rerun the same command with a lower learning rate (--lr; `run`: --teacher-lr, --tailor-lr or "
            "--finetune-lr) and --overwrite (the stage starts again)"
            + ("; a teacher term that explodes is bounded by `tailor --teacher-loss relative`" if "teacher" in which else "")
        )
