"""``nettailor run``: every stage in order, every option checked before the first epoch; testable
without Typer."""
from __future__ import annotations

import math
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, cast

import timm
import torch

from .. import __version__
from ..backbone import check_backbone_name, describe_chain
from ..errors import ExportError, UsageError
from ..runs import lock_dir, read_run, read_summary, reset_run, stage_done, write_run
from ..train import Callbacks, resolve_device
from .finetune import finetune
from .options import (
    BackboneOptions,
    DataOptions,
    SearchOptions,
    TailorOptions,
    TrainOptions,
    data_path,
    weights_option,
    with_run_data,
)
from .prune import prune
from .search import auto_prune
from .search_records import check_run_resume
from .tailor import tailor


def run_pipeline(run: Path, export_dir: Path | None, bb: BackboneOptions, data: DataOptions, opts: TailorOptions,
                 tailor_train: TrainOptions, finetune_train: TrainOptions, search: SearchOptions,
                 drop_blocks: int | None = None, *, resume: bool = False, overwrite: bool = False,
                 task_name: str | None = None, callbacks: Callbacks | None = None,
                 on_stage: Callable[[dict], None] | None = None) -> dict:
    """``nettailor run``: teacher (``opts.teacher_train``), tailor, the K search (or K = ``drop_blocks``),
    finetune, export to ``export_dir`` (default ``run/export``), and the report of the run.

    Every option of every stage, the export directory and K against the backbone's blocks are
    checked before anything is trained; the export's weights, once the backbone is loaded and
    still before the first epoch. The K search's candidates train with ``finetune_train``'s batch
    size and learning rate. ``on_stage`` is called with each stage's record as the stage ends, in
    pipeline order (teacher, tailor, search, prune, finetune, export). Returns the report with
    ``stages`` (those records), ``export``, ``wall_seconds`` and, when the chosen network misses the
    tolerance, ``error`` (exit 7). The adapter is exported as ``task_name`` (default: the data's name);
    a task of that name already in ``export_dir`` is another run's, and is refused before any training
    unless the run is resumed (it may be this run's own export) or ``overwrite`` asks to replace it.
    """
    from ..adapter import ADAPTER_CONFIG, check_export_target, export_task, read_adapter_config, run_id
    from ..report import report_run

    cb = callbacks or Callbacks()
    t0 = time.perf_counter()
    export_dir = Path(export_dir) if export_dir is not None else run / "export"
    trains = {"teacher": opts.teacher_train, "tailor": tailor_train, "finetune": finetune_train}
    num_blocks = _check_run_options(bb, trains, opts, search, drop_blocks, export_dir, task_name, resume=resume,
                                    overwrite=overwrite)
    trains = {stage: replace(train, resume=resume) for stage, train in trains.items()}
    opts, tailor_train, finetune_train = (replace(opts, teacher_train=trains["teacher"]), trains["tailor"],
                                          trains["finetune"])

    def ready(meta: dict) -> None:  # backbone and data known, nothing trained yet
        task = task_name or meta.get("task_name")
        check_export_target(export_dir, meta["backbone"], task)
        if task and not overwrite and (export_dir / task / ADAPTER_CONFIG).exists():
            source = read_adapter_config(export_dir / task).get("run_id")  # absent in exports made before it was
            if not resume or (source is not None and source != run_id(run)):  # recorded: taken as the run's own
                raise ExportError(f"task '{task}' already exists in '{export_dir}' (another run's export); pass "
                                  "--task-name NAME, another --export-dir, or --overwrite to replace it")

    stages: list[dict] = []
    earlier = {name for name in ("teacher", "tailor", "prune", "finetune") if resume and stage_done(run, name)}
    earlier |= {"search"} if "prune" in earlier else set()

    def ended(record: dict) -> None:
        stages.append(record | ({"reused": True} if record["stage"] in earlier else {}))
        if on_stage is not None:
            on_stage(stages[-1])

    def teacher_ended() -> None:  # the teacher is trained inside the tailor stage: its line comes when it ends
        if not any(r["stage"] == "teacher" for r in stages) and stage_done(run, "teacher"):
            ended({"run": str(run), **read_summary(run, "teacher")})

    with lock_dir(run):  # one writer across all the stages (each stage locks it again)
        if resume:
            check_run_resume(run, search.threshold, drop_blocks, search.tolerance, search.max_macs, search.search_epochs,
                             search.noise_allowance)
        if overwrite:
            reset_run(run)
        pruned_before = resume and stage_done(run, "prune")
        # a K search that had ended goes on from its records (auto_prune); a network pruned by hand is fine-tuned
        searching = drop_blocks is None and not (pruned_before and not (run / "search" / "frontier.json").is_file())
        tries = 1 + math.ceil(math.log2(num_blocks + 1))  # the reference, then a bisection over at most L+1 networks
        cb.on_plan([("teacher", opts.teacher_train.epochs)] * (opts.teacher is None) + [("tailor", tailor_train.epochs)]
                   + [("search", tries * search.search_epochs)] * (searching and not pruned_before)
                   + [("finetune", finetune_train.epochs)])
        tailored = tailor(run, bb, data, tailor_train, opts, cast(Callbacks, _BeforeTailor(cb, teacher_ended)),
                          on_ready=ready)
        teacher_ended()
        ended({"run": str(run), **tailored})
        meta = {k: v for k, v in read_run(run).items() if k != "format"}
        used = replace(data, split_seed=with_run_data(data, meta).split_seed)  # the split the run has
        write_run(run, meta | {"command": "run", "options": _run_options(bb, used, trains, opts, search, drop_blocks, task_name),
                               "environment": environment(trains["tailor"].device)})
        searched: dict | None = None
        if searching:
            earlier.difference_update({"search", "prune", "finetune"})  # auto_prune says which it read back
            search_train = replace(finetune_train, epochs=search.search_epochs)
            searched = auto_prune(run, data, search_train, finetune_train, search, teacher_weight=opts.teacher_weight,
                                  overwrite=not pruned_before, resume=resume, callbacks=cb, on_stage=ended)
        else:
            if "prune" in earlier:  # --resume: pruned by hand before
                ended({"run": str(run), **read_summary(run, "prune")})
            elif drop_blocks is not None:
                ended({"run": str(run), **prune(run, threshold=search.threshold, drop_blocks=drop_blocks,
                                                overwrite=True, callbacks=cb)})
            teacher = read_summary(run, "teacher") if stage_done(run, "teacher") else {}
            final = finetune(run, data, finetune_train, teacher_weight=opts.teacher_weight, callbacks=cb)
            ended({"run": str(run), **final, "teacher_val_acc": teacher.get("val_acc"),
                   "teacher_test_acc": teacher.get("test_acc")})
        t_export = time.perf_counter()
        exported = export_task(run, export_dir, task_name=task_name, overwrite=True)
        ended({**exported, "stage": "export", "exported_stage": exported["stage"],
               "wall_seconds": round(time.perf_counter() - t_export, 1)})
        result = report_run(run)
        result["export"] = exported
    result["stages"] = stages
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if searched is not None and searched.get("error"):
        result["error"] = searched["error"]  # exit 7: the document says why, as prune --auto's does
    return result


class _BeforeTailor:
    """The callbacks ``run`` passes on, calling ``before`` when the tailor stage starts training (the
    teacher, trained inside that stage, has ended then); every other callback goes to ``inner`` as is."""

    def __init__(self, inner: Callbacks, before: Callable[[], None]):
        self._inner, self._before = inner, before

    def on_stage_start(self, stage: str, *args: Any, **kwargs: Any) -> None:
        if stage == "tailor":
            self._before()
        self._inner.on_stage_start(stage, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def environment(device: str) -> dict:
    """What a reader needs to compare two runs' times and numbers: versions, threads, device, CPU model."""
    return {"nettailor": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "device": str(resolve_device(device)), "cpu": cpu_model(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def cpu_model() -> str | None:
    """The CPU's model name: ``/proc/cpuinfo`` (Linux), else ``platform.processor()``; ``None`` when neither says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def _check_run_options(bb: BackboneOptions, trains: dict[str, TrainOptions], opts: TailorOptions,
                       search: SearchOptions, drop_blocks: int | None, export_dir: Path, task_name: str | None, *,
                       resume: bool, overwrite: bool) -> int:
    """What ``run`` can check before loading data or weights; returns the backbone's number of blocks."""
    from ..adapter import check_export_target
    from ..pruning import validate_args

    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    for stage, train in trains.items():
        train.validate(f"{stage}-")
    opts.validate()
    search.validate()
    if drop_blocks is not None and search.max_macs is not None:
        raise UsageError("--max-macs chooses K itself; drop --drop-blocks (or drop --max-macs to use exactly K)")
    check_backbone_name(bb.name)
    with torch.device("meta"):  # the architecture alone: no weights, no memory
        model = timm.create_model(bb.name.split(".", 1)[0], pretrained=False, num_classes=0)
    num_blocks = len(describe_chain(model).blocks)
    if drop_blocks is not None:
        validate_args(search.threshold, drop_blocks, num_blocks)
    check_export_target(export_dir, {"architecture": model.pretrained_cfg["architecture"]}, task_name)
    return num_blocks


def _run_options(bb: BackboneOptions, data: DataOptions, trains: dict[str, TrainOptions], opts: TailorOptions,
                 search: SearchOptions, drop_blocks: int | None, task_name: str | None) -> dict:
    """``run``'s options under its own names, recorded in ``run.json``: ``nettailor run -c RUN/run.json`` repeats it."""
    common = trains["tailor"]
    options = {"data": data_path(data.data) if data.data else None, "task": data.task, "img_size": data.img_size,
               "val_fraction": data.val_fraction, "hflip": data.hflip, "skip_bad": data.skip_bad,
               "split_seed": data.split_seed,
               "cache": data.cache, "workers": data.workers, "backbone": bb.name, "pretrained": bb.pretrained,
               "weights": weights_option(bb),
               "max_skip": opts.max_skip, "complexity_weight": opts.complexity_weight,
               "teacher_weight": opts.teacher_weight, "teacher_loss": opts.teacher_loss, "train_bn": opts.train_bn,
               "kd_weight": opts.kd_weight, "kd_temperature": opts.kd_temperature,
               "attention_slow_epochs": opts.attention_slow_epochs, "attention_slow_factor": opts.attention_slow_factor,
               "threshold": search.threshold,
               "drop_blocks": drop_blocks, "tolerance": search.tolerance, "max_macs": search.max_macs,
               "search_epochs": search.search_epochs,
               "noise_allowance": search.noise_allowance, "fallbacks": search.fallbacks, "seed": common.seed, "device": common.device,
               "amp": common.amp, "keep_checkpoints": common.keep_checkpoints, "schedule": common.schedule,
               "label_smoothing": common.label_smoothing,
               "clip_grad": common.clip_grad if common.clip_grad is not None else 0,  # --clip-grad 0: unclipped
               "teacher": str(Path(opts.teacher).resolve()) if opts.teacher else None, "task_name": task_name}
    for stage, train in trains.items():
        options |= {f"{stage}_epochs": train.epochs, f"{stage}_lr": train.lr, f"{stage}_batch_size": train.batch_size}
    return {key: value for key, value in options.items() if value is not None}
