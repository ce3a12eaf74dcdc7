"""What the stages share: the run's data and backbone, loaders, the one-writer lock, the student's
training, held-out accuracies."""
from __future__ import annotations

import contextlib
import functools
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from torch import nn

from .. import defaults
from .. import distributed as dist
from ..backbone import backbone_identity, create_backbone, describe_chain
from ..checkpoint import read_json, write_json
from ..counting import full_network, student_macs, student_params
from ..errors import DataError, RunError, UsageError
from ..frozen import (
    FROZEN_KEY,
    backbone_from_store,
    can_build_from_store,
    frozen_keys,
    frozen_record,
    save_student,
    write_store,
)
from ..loading import ensure_store, student_meta
from ..objectives import StudentObjective
from ..runs import CHECKPOINT, MODEL, lock_created, lock_dir, read_run, write_run, write_summary
from ..student import Student
from ..train import BEST, Callbacks, autocast_context, fit
from .options import BackboneOptions, DataOptions, TrainOptions, data_path, with_run_data

REDO_TEACHER = "`nettailor teacher --output {run} --overwrite` redoes it (and the run)"


def other_data(saved: dict, given: str | None) -> bool:
    """Whether ``given`` (a --data) names other data than a run's record ``saved`` (run.json "data")."""
    return given is not None and saved.get("path") not in (None, data_path(given))


def check_run_data(run: Path, run_meta: dict | None, data: DataOptions) -> None:
    """Every stage of a run trains on the run's data and split (a later --data, --val-fraction or
    --split-seed must name the same: the split is made once, by the run's first stage)."""
    if run_meta is None:
        return
    saved = run_meta["data"]
    if other_data(saved, data.data):
        raise UsageError(
            f"run '{run}' was made on '{saved.get('given') or saved['path']}', not '{data.data}'; pass that --data, "
            "choose another --output, or start the run over (teacher/run --overwrite)"
        )
    for option, given, key in (("--val-fraction", data.val_fraction, "val_fraction"),
                               ("--split-seed", data.split_seed, "seed")):
        if given is not None and key in saved and given != saved[key]:
            raise UsageError(
                f"run '{run}' was split with {option} {saved[key]}, not {given}; leave {option} out (a later "
                "stage uses the run's split), choose another --output, or start the run over (teacher/run --overwrite)"
            )
    # The input size and the flips are the run's too: pruning counts MACs and the export serves at the run's size.
    shown = {"img_size": lambda v: f"--img-size {v}", "hflip": lambda v: "--hflip" if v else "--no-hflip"}
    for key, given in (("img_size", data.img_size), ("hflip", data.hflip)):
        if given is not None and saved.get(key) is not None and given != saved[key]:
            raise UsageError(
                f"run '{run}' was made with {shown[key](saved[key])}, not {shown[key](given)}; leave it out (a later "
                "stage uses the run's), choose another --output, or start the run over (teacher/run --overwrite)"
            )


def one_writer(create: bool):
    """Run the decorated stage holding its run directory's lock (``runs.lock_dir``): one writer per run.

    ``create``: the stage may start a new run (teacher, tailor), so the lock makes the directory.
    """
    def wrap(stage):
        @functools.wraps(stage)
        def locked(run, *args, **kwargs):
            with lock_dir(Path(run), create=create):
                return stage(run, *args, **kwargs)
        return locked
    return wrap


@contextlib.contextmanager
def new_run_guard(run: Path):
    """If ``run`` did not exist and setup fails, remove whatever setup wrote (e.g. split.json)."""
    existed = run.exists() and not lock_created(run)
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(run, ignore_errors=True)
        raise


def load_data(run_meta: dict | None, opts: DataOptions, data_config: dict, run: Path):
    from ..data import load_task_data

    used = with_run_data(opts, run_meta)
    if used.data is None:
        raise UsageError("--data is required")
    assert used.val_fraction is not None and used.split_seed is not None  # with_run_data falls back to the defaults
    return load_task_data(
        used.data,
        data_config=data_config,
        img_size=used.img_size,
        split_file=run / "split.json",
        task=used.task,
        val_fraction=used.val_fraction,
        seed=used.split_seed,
        download=opts.download,
        cache=opts.cache,
        hflip=used.hflip,
        skip_bad=used.skip_bad,
        expected_classes=(run_meta or {}).get("classes"),
        augment=opts.augment,
    )


def say_skipped(cb: Callbacks, task) -> None:
    """--skip-bad: say how many unreadable images were left out, and which."""
    if task.skipped:
        shown = ", ".join(task.skipped[:3]) + (", ..." if len(task.skipped) > 3 else "")
        cb.on_message(f"data: skipped {len(task.skipped)} unreadable image(s) (--skip-bad): {shown}")


def loaders(task, batch_size: int, device: torch.device, seed: int, workers: int | None):
    from ..data import make_loader

    train = make_loader(task.train, batch_size=batch_size, train=True, device=device, num_workers=workers, seed=seed,
                        sampler=dist.train_sampler(task.train, seed))
    val = make_loader(dist.eval_shard(task.val), batch_size=max(batch_size, 64), train=False, device=device,
                      num_workers=workers, seed=seed)
    if len(train) == 0:
        raise DataError(
            f"the training split has {len(task.train)} images, fewer than one batch of {batch_size}; lower --batch-size"
        )
    return train, val


def data_record(task, opts: DataOptions) -> dict:
    assert opts.data is not None  # a run's first stage is always given --data
    return {
        "path": data_path(opts.data), "given": opts.data, "layout": task.layout, "name": task.name,
        "task": opts.task, "img_size": task.img_size, "mean": list(task.mean), "std": list(task.std),
        "interpolation": task.interpolation, "crop_pct": task.crop_pct, "crop_mode": task.crop_mode, "hflip": task.hflip,
        "val_fraction": opts.val_fraction if opts.val_fraction is not None else defaults.VAL_FRACTION,
        "seed": opts.split_seed if opts.split_seed is not None else defaults.SPLIT_SEED,  # the split's (--split-seed)
        "skip_bad": opts.skip_bad,  # later stages (and prune --auto, which has no --skip-bad) skip them too
    }


def build_backbone(bb: BackboneOptions, num_classes: int, seed: int) -> nn.Module:
    """The pretrained backbone; seeded so that a random init (--no-pretrained) is the same in every stage."""
    torch.manual_seed(seed)
    return create_backbone(bb.name, num_classes=num_classes, pretrained=bb.pretrained, weights=bb.weights)


def run_backbone(run: Path, run_meta: dict | None, bb: BackboneOptions, num_classes: int, seed: int) -> nn.Module:
    """The backbone a stage of ``run`` starts from: from the run's own store once it has one (the weights
    file or download is then not needed: the run can move), else from ``bb`` (``--weights``, the hub)."""
    if run_meta is None or not can_build_from_store(run):
        return build_backbone(bb, num_classes, seed)
    recorded = run_meta["backbone"]
    model = backbone_from_store(run, bb.name, recorded["sha256"], num_classes, seed)
    given = backbone_identity(model, name=bb.name, weights=bb.weights, pretrained=bb.pretrained)
    if (given["architecture"], given["weights_source"]) != (recorded["architecture"], recorded["weights_source"]):
        raise RunError(f"run '{run}' was made with {recorded['name']} ({recorded['weights_source']}), not {bb.name} "
                       f"({given['weights_source']}); pass its --backbone and --weights, or use another --output")
    return model


def keep_backbone(run: Path, run_meta: dict | None, model: nn.Module, identity: dict) -> None:
    """Store the run's frozen backbone once, from the freshly built ``model``, if the run lacks it: a new run,
    or one written before runs stored it. Call it before any training and after ``run.json`` exists."""
    if dist.decided(lambda: can_build_from_store(run)):  # under torchrun every rank takes the same branch
        return
    write_store(run, model, identity["sha256"])  # rank 0 writes
    if run_meta is not None:  # an older run: its run.json now says the current format
        write_run(run, {k: v for k, v in read_run(run).items() if k != "format"})
    dist.barrier()


def data_config(name: str) -> dict:
    """timm's data config for a backbone name (mean/std/interpolation/crop), without weights."""
    model = timm.create_model(name, pretrained=False, num_classes=0)
    return timm.data.resolve_data_config({}, model=model)


def _student_groups(student: Student, attention_slow: tuple[int, float] | None = None) -> list[dict]:
    """Attention logits get no weight decay and no gradient clipping (docs/method.md); with ``attention_slow``
    = (epochs, factor) they learn at ``factor`` times the rate for the first ``epochs`` epochs (schedule.py)."""
    logit_ids = set(id(p) for p in student.attention_parameters())
    rest = [p for p in student.trainable_parameters() if id(p) not in logit_ids]
    logits = [p for p in student.attention_parameters() if p.requires_grad]
    slow = {"slow_epochs": attention_slow[0], "slow_factor": attention_slow[1]} if attention_slow else {}
    return [{"params": rest}, {"params": logits, "name": "attention", "weight_decay": 0.0, "clip": False, **slow}]


@dataclass(frozen=True)
class Distillation:
    """How the student learns from its teacher besides ``g2``: the teacher term's form and the logit KD.

    Chosen at ``tailor`` (recorded in its config.json); the search and ``finetune`` keep it
    (:func:`tailored_distillation`).
    """

    teacher_loss: str = defaults.TEACHER_LOSS
    kd_weight: float = defaults.KD_WEIGHT
    kd_temperature: float = defaults.KD_TEMPERATURE


def fit_student(run: Path, stage: str, student: Student, teacher: nn.Module | None, task, data: DataOptions,
                 train: TrainOptions, device: torch.device, cb: Callbacks, *, complexity, g1: float, g2: float,
                 distill: Distillation, extra: dict, keep: str = "best", held_out: bool = True,
                 attention_slow: tuple[int, float] | None = None) -> dict:
    """Train ``student`` as stage ``stage`` of ``run`` and write its model, config and summary.

    ``attention_slow``: (epochs, factor), the attention logits' slow start (the tailor stage's).
    """
    t0 = time.perf_counter()
    cfg = train.config(device)
    student = student.to(device)
    if complexity is not None:
        complexity = complexity.to(device)
    if cfg.channels_last:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last) if teacher is not None else None
    stage_dir = run / stage
    write_json(stage_dir / "config.json", {"stage": stage, "train": asdict(train), "resolved": asdict(cfg),
                                           "data": asdict(data), "device": str(device), **extra})
    train_loader, val_loader = loaders(task, train.batch_size, device, train.seed, data.workers)
    chain = describe_chain(teacher) if teacher is not None else None
    for layer in student.layers:  # a softmax over one path is the constant 1: nothing to learn
        if layer.alive and layer.logits.numel() == 1:
            layer.logits.requires_grad_(False)
    say_distributed(cb, train)
    student = dist.sync_batchnorm(student, device)
    forward = maybe_compile(dist.wrap(student, device), train.compile)
    objective = StudentObjective(student, teacher, chain, complexity, g1, g2, forward=forward,
                                 teacher_loss=distill.teacher_loss, kd_weight=distill.kd_weight,
                                 kd_temperature=distill.kd_temperature, label_smoothing=cfg.label_smoothing)
    ensure_store(run)
    ident = read_run(run)["backbone"]
    arch, sha = ident["architecture"], ident["sha256"]
    row = fit(stage=stage, stage_dir=stage_dir, model=student, objective=objective,
              param_groups=_student_groups(student, attention_slow), train_loader=train_loader, val_loader=val_loader,
              device=device, cfg=cfg, resume=train.resume, callbacks=cb,
              checkpoint_extra={**student_meta(student, arch, stage), FROZEN_KEY: frozen_record(run, stage_dir, sha)},
              keep=keep, frozen=frozen_keys(student))
    save_student(run, stage_dir, MODEL, student, student_meta(student, arch, stage), sha)
    summary = {"stage": stage, **accuracies(row, student, task, train, device, cfg, held_out=held_out),
               "structure": student.structure.counts(), "params": student_params(student),
               "macs": student_macs(student, task.img_size).total,
               "macs_full": full_network(arch, student.num_classes, task.img_size)["macs"],  # the MAC reference
               "skipped_images": list(task.skipped),
               "attention": [a.tolist() if a is not None else None for a in student.attention()],
               "wall_seconds": round(time.perf_counter() - t0, 1)}
    write_summary(run, stage, summary)
    drop_resume_files(stage_dir, train)
    dist.barrier()
    return summary


def accuracies(row: dict, model: nn.Module, task, train: TrainOptions, device: torch.device, cfg,
                held_out: bool = True) -> dict:
    """A stage's accuracies: validation (of the epoch kept) and, where the data has one, test.

    The test split is evaluated once, on the final weights, and only reported: no choice
    (epoch kept, K) ever reads it.
    """
    from ..data import make_loader
    from ..train import evaluate

    out = {"val_acc": row["val_acc"], "best_val_acc": row["best_val_acc"], "kept_epoch": row["kept_epoch"],
           "epochs": row["epochs_trained"], "test_acc": None,
           "split_sizes": {"train": len(task.train), "val": len(task.val),
                           "test": len(task.test) if task.test is not None else None}}
    if held_out and task.test is not None:
        loader = make_loader(dist.eval_shard(task.test), batch_size=max(train.batch_size, 64), train=False,
                             device=device, num_workers=0)
        amp = autocast_context(cfg, device)
        out["test_acc"] = evaluate(model, loader, device, amp_ctx=amp, channels_last=cfg.channels_last)["acc"]
    return out


def tailored_distillation(run: Path, teacher_weight: float) -> Distillation:
    """How the run's student was tailored to learn from its teacher; the search and fine-tuning keep it.

    ``teacher_weight`` is the later stage's own g2: 0 turns the teacher off, logit KD included.
    Runs made before an option existed were tailored without it: the paper's plain MSE, no logit KD.
    """
    settings = read_json(run / "tailor" / "config.json", what="tailor config").get("settings", {})
    return Distillation(teacher_loss=settings.get("teacher_loss", "mse"),
                        kd_weight=settings.get("kd_weight", 0.0) if teacher_weight > 0 else 0.0,
                        kd_temperature=settings.get("kd_temperature", defaults.KD_TEMPERATURE))


def maybe_compile(module: nn.Module, enabled: bool) -> Callable[..., Any]:
    """``torch.compile`` the training forward (--compile); weights stay shared with ``module``."""
    return torch.compile(module) if enabled else module


def say_distributed(cb: Callbacks, train: TrainOptions) -> None:
    info = dist.info()
    if info.enabled:
        cb.on_message(f"distributed: {info.world_size} processes x --batch-size {train.batch_size} = effective batch "
                      f"{info.world_size * train.batch_size}; --lr {train.lr} used as given (no scaling rule)")


def drop_resume_files(stage_dir: Path, train: TrainOptions) -> None:
    """A finished stage's ``model.safetensors`` is all that later stages read: its checkpoint (weights and
    optimiser state, for --resume) and best-epoch copy go, unless ``keep_checkpoints``."""
    if train.keep_checkpoints or not dist.is_main():
        return
    for name in (CHECKPOINT, BEST):
        (stage_dir / name).unlink(missing_ok=True)
