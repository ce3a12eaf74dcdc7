"""The NetTailor stages: teacher, tailor, prune, finetune (docs/method.md, "Pipeline").

Each function validates everything it can *before* creating a file, runs the
stage through :func:`tailor_cli.train.fit`, and writes its stage directory
(see :mod:`tailor_cli.runs`). Nothing here prints; progress goes to callbacks.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import timm
import torch
from torch import nn

from . import __version__, defaults
from . import distributed as dist
from .backbone import backbone_identity, check_backbone_name, create_backbone, describe_chain
from .checkpoint import read_json, read_safetensors, write_json, write_safetensors
from .counting import model_macs, network_params, path_costs, student_macs, student_params
from .errors import DataError, RunError, UsageError
from .losses import TEACHER_LOSSES, ComplexityModel
from .pruning import connecting_threshold
from .pruning import plan as plan_pruning
from .runs import (
    CHECKPOINT,
    MODEL,
    check_settings,
    check_writable,
    locate_teacher,
    lock_created,
    lock_dir,
    prepare_stage,
    read_run,
    read_summary,
    require_stage,
    reset_run,
    stage_done,
    write_run,
    write_summary,
)
from .student import Structure, Student
from .train import (
    BEST,
    Callbacks,
    StudentObjective,
    TeacherObjective,
    TrainConfig,
    autocast_context,
    fit,
    resolve_device,
)
from .weights import PKG_PREFIX, resolve_weights_path


# --------------------------------------------------------------------------- options
@dataclass
class DataOptions:
    data: str | None = None
    task: str | None = None
    img_size: int | None = None
    val_fraction: float | None = None
    download: bool = False
    cache: bool = False
    hflip: bool | None = None
    skip_bad: bool = False
    workers: int | None = None
    augment: bool = True


@dataclass
class TrainOptions:
    epochs: int = defaults.EPOCHS
    batch_size: int = defaults.BATCH_SIZE["tailor"]
    lr: float = defaults.LR["tailor"]
    lr_step: int | None = None  # default: 40% of the epochs (SVHN demo: 20 epochs, decay every 8)
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None  # None: on for CUDA (bf16)
    amp_dtype: str = "bfloat16"
    channels_last: bool | None = None  # None: on for CUDA
    compile: bool = False  # torch.compile the training forward
    clip_grad: float | None = defaults.CLIP_GRAD  # max gradient norm of the weights per step; None: off
    resume: bool = False
    overwrite: bool = False
    keep_checkpoints: bool = False  # keep checkpoint.safetensors (and best.safetensors) once the stage is done

    @classmethod
    def for_stage(cls, stage: str, *, epochs: int | None = None, lr: float | None = None,
                  batch_size: int | None = None, **rest) -> "TrainOptions":
        """Options of a training stage (teacher, tailor, finetune), its defaults (``defaults.py``) for those not given."""
        return cls(epochs=defaults.EPOCHS if epochs is None else epochs, lr=defaults.LR[stage] if lr is None else lr,
                   batch_size=defaults.BATCH_SIZE[stage] if batch_size is None else batch_size, **rest)

    def validate(self, flag: str = "") -> None:
        """``flag``: the prefix of the options as the command names them (``teacher-`` for ``--teacher-epochs``)."""
        if self.epochs <= 0:
            raise UsageError(f"--{flag}epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise UsageError(f"--{flag}batch-size must be positive, got {self.batch_size}")
        if not self.lr > 0:
            raise UsageError(f"--{flag}lr must be positive, got {self.lr}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise UsageError(f"--clip-grad must be positive, got {self.clip_grad}; pass --clip-grad 0 to train unclipped")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise UsageError(f"--amp-dtype must be bfloat16 or float16, got '{self.amp_dtype}'")

    def config(self, device: torch.device) -> TrainConfig:
        amp = self.amp if self.amp is not None else device.type == "cuda"
        cl = self.channels_last if self.channels_last is not None else device.type == "cuda"
        return TrainConfig(
            epochs=self.epochs, lr=self.lr, lr_step=self.lr_step or max(1, round(0.4 * self.epochs)),
            seed=self.seed, amp=amp, amp_dtype=self.amp_dtype, channels_last=cl,
            check_every=1 if device.type == "cpu" else 50, clip_grad=self.clip_grad,
        )


@dataclass
class BackboneOptions:
    name: str = "resnet34"
    pretrained: bool = True
    weights: Path | None = None


def stage_settings(train: TrainOptions, device: torch.device, data: DataOptions | None = None,
                   bb: BackboneOptions | None = None, run_meta: dict | None = None, **extra) -> dict:
    """What a stage's result depends on, resolved: recorded in its config.json, compared on --resume.

    Options not given take the run's values (``run.json``) and defaults are resolved (``lr_step``,
    ``amp`` for the device), so naming a value the run already uses is no change. Options that
    only change speed (device, workers, cache, compile, channels-last) are left out.
    """
    cfg = train.config(device)
    out = {"epochs": train.epochs, "batch_size": train.batch_size, "lr": train.lr, "lr_step": cfg.lr_step,
           "seed": train.seed, "amp": cfg.amp, "amp_dtype": cfg.amp_dtype if cfg.amp else None,
           "clip_grad": cfg.clip_grad if cfg.clip_grad is not None else "off"}
    if data is not None:
        saved = (run_meta or {}).get("data", {})
        out |= {
            "data": _data_path(data.data) if data.data else saved.get("path"),
            "task": data.task if data.task is not None else saved.get("task"),
            "img_size": data.img_size if data.img_size is not None else saved.get("img_size"),
            "val_fraction": data.val_fraction if data.val_fraction is not None else saved.get("val_fraction", defaults.VAL_FRACTION),
            "hflip": data.hflip if data.hflip is not None else saved.get("hflip"),
            "augment": data.augment, "skip_bad": data.skip_bad,
        }
    if bb is not None:
        out |= {"backbone": bb.name, "pretrained": bb.pretrained,
                "weights": str(resolve_weights_path(bb.weights).resolve()) if bb.weights else None}
    return out | extra


_REDO_TEACHER = "`nettailor teacher --output {run} --overwrite` redoes it (and the run)"


def _other_data(saved: dict, given: str | None) -> bool:
    """Whether ``given`` (a --data) names other data than a run's record ``saved`` (run.json "data")."""
    return given is not None and saved.get("path") not in (None, _data_path(given))


def _check_run_data(run: Path, run_meta: dict | None, data: DataOptions) -> None:
    """Every stage of a run trains on the run's data (a later --data must name the same)."""
    if run_meta is None or not _other_data(run_meta["data"], data.data):
        return
    saved = run_meta["data"]
    raise UsageError(
        f"run '{run}' was made on '{saved.get('given') or saved['path']}', not '{data.data}'; pass that --data, "
        "choose another --output, or start the run over (teacher/run --overwrite)"
    )


# --------------------------------------------------------------------------- shared helpers
def _one_writer(create: bool):
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
def _new_run_guard(run: Path):
    """If ``run`` did not exist and setup fails, remove whatever setup wrote (e.g. split.json)."""
    existed = run.exists() and not lock_created(run)
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(run, ignore_errors=True)
        raise


def _load_data(run_meta: dict | None, opts: DataOptions, data_config: dict, run: Path, seed: int):
    from .data import load_task_data

    saved = (run_meta or {}).get("data", {})
    data = opts.data or saved.get("path")
    if data is None:
        raise UsageError("--data is required")
    return load_task_data(
        data,
        data_config=data_config,
        img_size=opts.img_size if opts.img_size is not None else saved.get("img_size"),
        split_file=run / "split.json",
        task=opts.task or saved.get("task"),
        val_fraction=opts.val_fraction if opts.val_fraction is not None else saved.get("val_fraction", defaults.VAL_FRACTION),
        seed=saved.get("seed", seed),
        download=opts.download,
        cache=opts.cache,
        hflip=opts.hflip if opts.hflip is not None else saved.get("hflip"),
        skip_bad=opts.skip_bad,
        expected_classes=(run_meta or {}).get("classes"),
        augment=opts.augment,
    )


def _say_skipped(cb: Callbacks, task) -> None:
    """--skip-bad: say how many unreadable images were left out, and which."""
    if task.skipped:
        shown = ", ".join(task.skipped[:3]) + (", ..." if len(task.skipped) > 3 else "")
        cb.on_message(f"data: skipped {len(task.skipped)} unreadable image(s) (--skip-bad): {shown}")


def _data_path(data: str) -> str:
    p = Path(data)
    return str(p.resolve()) if p.exists() else data


def _loaders(task, batch_size: int, device: torch.device, seed: int, workers: int | None):
    from .data import make_loader

    train = make_loader(task.train, batch_size=batch_size, train=True, device=device, num_workers=workers, seed=seed,
                        sampler=dist.train_sampler(task.train, seed))
    val = make_loader(dist.eval_shard(task.val), batch_size=max(batch_size, 64), train=False, device=device,
                      num_workers=workers, seed=seed)
    if len(train) == 0:
        raise DataError(
            f"the training split has {len(task.train)} images, fewer than one batch of {batch_size}; lower --batch-size"
        )
    return train, val


def _data_record(task, opts: DataOptions, seed: int) -> dict:
    return {
        "path": _data_path(opts.data), "given": opts.data, "layout": task.layout, "name": task.name,
        "task": opts.task, "img_size": task.img_size, "mean": list(task.mean), "std": list(task.std),
        "interpolation": task.interpolation, "crop_pct": task.crop_pct, "crop_mode": task.crop_mode, "hflip": task.hflip,
        "val_fraction": opts.val_fraction if opts.val_fraction is not None else defaults.VAL_FRACTION, "seed": seed,
    }


def _build_backbone(bb: BackboneOptions, num_classes: int, seed: int) -> nn.Module:
    """The pretrained backbone; seeded so that a random init (--no-pretrained) is the same in every stage."""
    torch.manual_seed(seed)
    return create_backbone(bb.name, num_classes=num_classes, pretrained=bb.pretrained, weights=bb.weights)


def _data_config(name: str) -> dict:
    """timm's data config for a backbone name (mean/std/interpolation/crop), without weights."""
    model = timm.create_model(name, pretrained=False, num_classes=0)
    return timm.data.resolve_data_config({}, model=model)


def load_teacher(teacher_dir: Path, device: torch.device) -> nn.Module:
    tensors, meta = read_safetensors(teacher_dir / MODEL, what="teacher weights")
    model = timm.create_model(meta["architecture"], pretrained=False, num_classes=int(meta["num_classes"]))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise RunError(f"teacher weights in '{teacher_dir}' do not fit '{meta['architecture']}': {str(err)[:160]}") from err
    return model.to(device)


def load_student(stage_dir: Path, device: torch.device) -> tuple[Student, dict]:
    """Rebuild a student of any stage from its ``model.safetensors`` alone (no download needed)."""
    tensors, meta = read_safetensors(stage_dir / MODEL, what="student weights")
    for key in ("architecture", "num_classes", "structure", "max_skip"):
        if key not in meta:
            raise RunError(f"'{stage_dir / MODEL}' lacks '{key}' in its metadata; it is not a student")
    backbone = timm.create_model(meta["architecture"], pretrained=False, num_classes=0)
    student = Student(backbone, int(meta["num_classes"]), max_skip=int(meta["max_skip"]),
                      structure=Structure.from_json(meta["structure"]))
    try:
        student.load_state_dict(tensors)
    except RuntimeError as err:
        raise RunError(f"student weights in '{stage_dir}' do not fit their structure: {str(err)[:160]}") from err
    return student.to(device), meta


def _student_meta(student: Student, architecture: str, stage: str) -> dict:
    return {"stage": stage, "architecture": architecture, "num_classes": student.num_classes,
            "max_skip": student.max_skip, "structure": student.structure.to_json(), "nettailor": __version__}


def _student_groups(student: Student, weight_decay: float) -> list[dict]:
    """Attention logits get no weight decay and no gradient clipping (docs/method.md)."""
    logits = set(id(p) for p in student.attention_parameters())
    rest = [p for p in student.trainable_parameters() if id(p) not in logits]
    logits = [p for p in student.attention_parameters() if p.requires_grad]
    return [{"params": rest}, {"params": logits, "weight_decay": 0.0, "clip": False}]


def _resolve_teacher_dir(path: Path) -> Path:
    path = Path(path)
    if (path / "teacher" / MODEL).is_file():
        return path / "teacher"
    if (path / MODEL).is_file() and path.name == "teacher":
        return path
    raise RunError(f"'{path}' holds no finished teacher (expected {path}/teacher/{MODEL}); run `nettailor teacher` first")


def _check_teacher_data(teacher_dir: Path, data: str | None) -> None:
    """Before any split is made: the teacher must have been trained on this data (a --data or a run's path)."""
    saved = read_run(teacher_dir.parent)["data"]
    if _other_data(saved, data):
        raise UsageError(
            f"teacher '{teacher_dir}' was fine-tuned on '{saved.get('given') or saved['path']}', but --data is "
            f"'{data}'; pass the teacher's data, or omit --teacher to train one on this data"
        )


def _check_teacher(teacher_dir: Path, backbone_id: dict, classes: list[str]) -> dict:
    run_meta = read_run(teacher_dir.parent)
    tb = run_meta["backbone"]
    if tb["architecture"] != backbone_id["architecture"]:
        raise RunError(
            f"teacher '{teacher_dir}' is a {tb['architecture']}, but the student uses {backbone_id['architecture']}; "
            "pass a teacher of the same backbone, or omit --teacher to train one"
        )
    if tb["sha256"] != backbone_id["sha256"]:
        random_init = tb["weights_source"] == backbone_id["weights_source"] == "random-init"
        fix = (f"a --no-pretrained backbone is initialised from --seed: pass the teacher's --seed "
               f"{run_meta['data'].get('seed')}" if random_init else "use the same --weights/--pretrained")
        raise RunError(
            f"teacher '{teacher_dir}' was fine-tuned from other {tb['architecture']} weights "
            f"({tb['weights_source']}, sha256 {tb['sha256'][:12]}) than this run's ({backbone_id['weights_source']}, "
            f"sha256 {backbone_id['sha256'][:12]}); {fix}"
        )
    if run_meta["classes"] != classes:
        raise RunError(
            f"teacher '{teacher_dir}' was trained on {len(run_meta['classes'])} classes "
            f"({', '.join(run_meta['classes'][:5])}...), this data has {len(classes)}; use a teacher for this task"
        )
    return run_meta


# --------------------------------------------------------------------------- teacher
@_one_writer(create=True)
def train_teacher(run: Path, bb: BackboneOptions, data: DataOptions, train: TrainOptions,
                  callbacks: Callbacks | None = None) -> dict:
    """Fine-tune the whole backbone with a new classifier (stage 1)."""
    cb = callbacks or Callbacks()
    train.validate()
    device = resolve_device(train.device)
    check_writable(run)
    if train.overwrite:  # the first stage: redoing it starts the run over (other data allowed)
        reset_run(run)
    run_meta = read_run(run) if (run / "run.json").exists() else None
    _check_run_data(run, run_meta, data)
    settings = stage_settings(train, device, data, bb, run_meta)
    done = prepare_stage(run, "teacher", resume=train.resume, overwrite=train.overwrite, settings=settings)
    if done:
        cb.on_message(f"teacher: already complete in {run}")
        return read_summary(run, "teacher")
    with _new_run_guard(run):
        check_backbone_name(bb.name)
        task = _load_data(run_meta, data, _data_config(bb.name), run, train.seed)
        model = _build_backbone(bb, len(task.classes), train.seed)
    _say_skipped(cb, task)
    identity = backbone_identity(model, name=bb.name, weights=bb.weights, pretrained=bb.pretrained)
    if run_meta is None:
        write_run(run, {"backbone": identity, "data": _data_record(task, data, train.seed), "classes": task.classes,
                        "task_name": task.name})
    elif run_meta["backbone"]["sha256"] != identity["sha256"]:
        raise RunError(f"run '{run}' was made with other backbone weights; use another --output or --overwrite")
    return _fit_teacher(run, bb, model, task, data, train, device, cb, stage_settings(train, device, data, bb, read_run(run)))


def _fit_teacher(run: Path, bb: BackboneOptions, model: nn.Module, task, data: DataOptions, train: TrainOptions,
                 device: torch.device, cb: Callbacks, settings: dict, made_by: str = "teacher") -> dict:
    t0 = time.perf_counter()
    cfg = train.config(device)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    stage_dir = run / "teacher"
    write_json(stage_dir / "config.json", {"stage": "teacher", "train": asdict(train), "resolved": asdict(cfg),
                                           "data": asdict(data) | {"data": data.data}, "device": str(device),
                                           "settings": settings, "made_by": made_by,
                                           "command": "teacher",
                                           "options": _options(settings, train, data, weights=_weights_option(bb))})
    train_loader, val_loader = _loaders(task, train.batch_size, device, train.seed, data.workers)
    _say_distributed(cb, train)
    model = dist.sync_batchnorm(model, device)
    forward = _maybe_compile(dist.wrap(model, device), train.compile)
    row = fit(stage="teacher", stage_dir=stage_dir, model=model, objective=TeacherObjective(model, forward),
              param_groups=[{"params": list(model.parameters())}], train_loader=train_loader,
              val_loader=val_loader, device=device, cfg=cfg, resume=train.resume, callbacks=cb, keep="best")
    arch = model.pretrained_cfg["architecture"]
    write_safetensors(stage_dir / MODEL, model.state_dict(),
                      {"stage": "teacher", "architecture": arch, "num_classes": len(task.classes)})
    summary = {"stage": "teacher", **_accuracies(row, model, task, train, device, cfg),
               "params": network_params(model), "macs": model_macs(model, task.img_size),
               "skipped_images": list(task.skipped), "wall_seconds": round(time.perf_counter() - t0, 1)}
    write_summary(run, "teacher", summary)
    _drop_resume_files(stage_dir, train)
    dist.barrier()  # other ranks may read the teacher next
    return summary


# --------------------------------------------------------------------------- tailor
@dataclass
class TailorOptions:
    teacher: Path | None = None
    max_skip: int = defaults.MAX_SKIP
    complexity_weight: float = defaults.COMPLEXITY_WEIGHT
    teacher_weight: float = defaults.TEACHER_WEIGHT
    teacher_loss: str = defaults.TEACHER_LOSS  # "mse" (the paper's form) or "relative" (scale-free); see losses.teacher_term
    teacher_train: TrainOptions = field(default_factory=lambda: TrainOptions.for_stage("teacher"))  # trained in the run

    def validate(self) -> None:
        if self.max_skip < 1:
            raise UsageError(f"--max-skip must be at least 1, got {self.max_skip}")
        if self.complexity_weight < 0 or self.teacher_weight < 0:
            raise UsageError("--complexity-weight and --teacher-weight must be >= 0")
        if self.teacher_loss not in TEACHER_LOSSES:
            raise UsageError(f"--teacher-loss must be one of {', '.join(TEACHER_LOSSES)}, got '{self.teacher_loss}'")


@_one_writer(create=True)
def tailor(run: Path, bb: BackboneOptions, data: DataOptions, train: TrainOptions, opts: TailorOptions,
           callbacks: Callbacks | None = None, on_ready: Callable[[dict], None] | None = None) -> dict:
    """Build the student and train it with CE + g1 E[C] + g2 Omega (stage 2).

    Without ``opts.teacher`` (and no finished teacher in ``run``), trains one first in ``run/teacher``.
    ``on_ready`` is called with the run's backbone identity and task name (as ``run.json`` records
    them) as soon as they are known, before any training, also when the stage is already done:
    ``run`` checks its export there.
    """
    cb = callbacks or Callbacks()
    train.validate()
    opts.teacher_train.validate("teacher-")
    opts.validate()
    device = resolve_device(train.device)
    check_writable(run)
    run_meta = read_run(run) if (run / "run.json").exists() else None
    _check_run_data(run, run_meta, data)
    teacher_dir = _resolve_teacher_dir(opts.teacher) if opts.teacher else None
    if teacher_dir is None and run_meta is not None and run_meta.get("teacher") not in (None, "teacher"):
        teacher_dir = locate_teacher(run, run_meta)  # the external teacher this run was started with

    teacher_setting = "teacher" if teacher_dir is None else str(teacher_dir.resolve())  # in the run: relative

    def settings_now(meta):
        return stage_settings(train, device, data, bb, meta, max_skip=opts.max_skip, teacher=teacher_setting,
                              complexity_weight=opts.complexity_weight, teacher_weight=opts.teacher_weight,
                              teacher_loss=opts.teacher_loss)

    done = prepare_stage(run, "tailor", resume=train.resume, overwrite=train.overwrite, settings=settings_now(run_meta))
    if done:
        if on_ready is not None:
            on_ready(read_run(run))
        cb.on_message(f"tailor: already complete in {run}")
        return read_summary(run, "tailor")
    if teacher_dir is not None:
        _check_teacher_data(teacher_dir, data.data or (run_meta or {}).get("data", {}).get("path"))
    with _new_run_guard(run):
        check_backbone_name(bb.name)
        if teacher_dir is not None and run_meta is None and (teacher_dir.parent / "split.json").exists():
            run.mkdir(parents=True, exist_ok=True)  # the student must see exactly the teacher's split
            shutil.copyfile(teacher_dir.parent / "split.json", run / "split.json")
        task = _load_data(run_meta, data, _data_config(bb.name), run, train.seed)
        backbone = _build_backbone(bb, len(task.classes), train.seed)
        _say_skipped(cb, task)
        identity = backbone_identity(backbone, name=bb.name, weights=bb.weights, pretrained=bb.pretrained)
        if teacher_dir is not None:
            _check_teacher(teacher_dir, identity, task.classes)
        if on_ready is not None:
            on_ready({"backbone": identity, "task_name": (run_meta or {}).get("task_name", task.name)})
    if run_meta is None:
        run_meta = {"backbone": identity, "data": _data_record(task, data, train.seed), "classes": task.classes,
                    "task_name": task.name}
        write_run(run, run_meta)
    elif run_meta["backbone"]["sha256"] != identity["sha256"]:
        raise RunError(f"run '{run}' was made with other backbone weights; use another --output or --overwrite")

    if teacher_dir is None:
        teacher_dir = run / "teacher"
        t_opts = opts.teacher_train
        t_opts.device = train.device
        t_opts.resume = train.resume or train.overwrite  # --overwrite redoes the tailor stage, not its teacher
        t_settings = stage_settings(t_opts, device, data, bb, read_run(run))
        made_by_tailor = (read_json(teacher_dir / "config.json", what="teacher config").get("made_by") == "tailor"
                          if (teacher_dir / "config.json").is_file() else True)
        if stage_done(run, "teacher"):
            if made_by_tailor:  # one from `nettailor teacher` is used as it is
                check_settings(run, "teacher", t_settings, done=True, redo=_REDO_TEACHER.format(run=run))
        else:
            if not made_by_tailor and (teacher_dir / CHECKPOINT).is_file():
                raise RunError(f"'{teacher_dir}' is an unfinished `nettailor teacher` stage; finish it first with "
                               f"`nettailor teacher --output {run} --resume` and its options")
            cb.on_message(f"tailor: the student learns from a fine-tuned teacher; fine-tuning one first in {teacher_dir}")
            prepare_stage(run, "teacher", resume=t_opts.resume, overwrite=False, settings=t_settings)
            _fit_teacher(run, bb, copy.deepcopy(backbone), task, data, t_opts, device, cb, t_settings, made_by="tailor")
    meta = read_run(run)
    inside = teacher_dir.resolve() == (run / "teacher").resolve()
    meta["teacher"] = "teacher" if inside else str(teacher_dir.resolve())
    write_run(run, {k: v for k, v in meta.items() if k != "format"})

    teacher = load_teacher(teacher_dir, device)
    teacher.eval().requires_grad_(False)
    student = Student(backbone, len(task.classes), max_skip=opts.max_skip)
    costs, backbone_macs = path_costs(student, task.img_size)
    settings = settings_now(read_run(run))
    t = opts.teacher_train  # its options are tailor's --teacher-* when tailor trains the teacher in the run
    in_run = {"teacher_epochs": t.epochs, "teacher_lr": t.lr, "teacher_batch_size": t.batch_size}
    options = _options(settings, train, data, weights=_weights_option(bb), **(in_run if inside else {}),
                       drop=("teacher",) if inside else ())
    return _fit_student(run, "tailor", student, teacher, task, data, train, device, cb,
                        complexity=ComplexityModel(student.structure, costs),
                        g1=opts.complexity_weight, g2=opts.teacher_weight, teacher_loss=opts.teacher_loss,
                        keep="last",  # the architecture is what the complexity schedule ends with
                        extra={"settings": settings, "max_skip": opts.max_skip, "complexity_weight": opts.complexity_weight,
                               "teacher_weight": opts.teacher_weight, "teacher": str(teacher_dir),
                               "path_costs": costs, "backbone_macs": backbone_macs,
                               "command": "tailor", "options": options})


def _fit_student(run: Path, stage: str, student: Student, teacher: nn.Module | None, task, data: DataOptions,
                 train: TrainOptions, device: torch.device, cb: Callbacks, *, complexity, g1: float, g2: float,
                 teacher_loss: str, extra: dict, keep: str = "best", held_out: bool = True) -> dict:
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
    train_loader, val_loader = _loaders(task, train.batch_size, device, train.seed, data.workers)
    chain = describe_chain(teacher) if teacher is not None else None
    for layer in student.layers:  # a softmax over one path is the constant 1: nothing to learn
        if layer.alive and layer.logits.numel() == 1:
            layer.logits.requires_grad_(False)
    _say_distributed(cb, train)
    student = dist.sync_batchnorm(student, device)
    forward = _maybe_compile(dist.wrap(student, device), train.compile)
    objective = StudentObjective(student, teacher, chain, complexity, g1, g2, forward=forward,
                                 teacher_loss=teacher_loss)
    arch = read_run(run)["backbone"]["architecture"]
    row = fit(stage=stage, stage_dir=stage_dir, model=student, objective=objective,
              param_groups=_student_groups(student, 5e-4), train_loader=train_loader, val_loader=val_loader,
              device=device, cfg=cfg, resume=train.resume, callbacks=cb,
              checkpoint_extra=_student_meta(student, arch, stage), keep=keep)
    write_safetensors(stage_dir / MODEL, student.state_dict(), _student_meta(student, arch, stage))
    summary = {"stage": stage, **_accuracies(row, student, task, train, device, cfg, held_out=held_out),
               "structure": student.structure.counts(), "params": student_params(student),
               "macs": student_macs(student, task.img_size).total, "skipped_images": list(task.skipped),
               "attention": [a.tolist() if a is not None else None for a in student.attention()],
               "wall_seconds": round(time.perf_counter() - t0, 1)}
    write_summary(run, stage, summary)
    _drop_resume_files(stage_dir, train)
    dist.barrier()
    return summary


def _accuracies(row: dict, model: nn.Module, task, train: TrainOptions, device: torch.device, cfg,
                held_out: bool = True) -> dict:
    """A stage's accuracies: validation (of the epoch kept) and, where the data has one, test.

    The test split is evaluated once, on the final weights, and only reported: no choice
    (epoch kept, K) ever reads it.
    """
    from .data import make_loader
    from .train import evaluate

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


def tailored_teacher_loss(run: Path) -> str:
    """The teacher-term form the run's student was tailored with; fine-tuning keeps it.

    Runs made before the option existed were tailored with the paper's plain MSE.
    """
    config = read_json(run / "tailor" / "config.json", what="tailor config")
    return config.get("settings", {}).get("teacher_loss", "mse")


def _maybe_compile(module: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile`` the training forward (--compile); weights stay shared with ``module``."""
    return torch.compile(module) if enabled else module


def _say_distributed(cb: Callbacks, train: TrainOptions) -> None:
    info = dist.info()
    if info.enabled:
        cb.on_message(f"distributed: {info.world_size} processes x --batch-size {train.batch_size} = effective batch "
                      f"{info.world_size * train.batch_size}; --lr {train.lr} used as given (no scaling rule)")


_RUN_DATA = ("img_size", "val_fraction", "hflip")  # data settings only the run's first stage takes


def _options(settings: dict, train: TrainOptions, data: DataOptions, *, drop: tuple[str, ...] = (), **extra) -> dict:
    """A stage's options under its command's names: what ``nettailor <stage> -c STAGE/config.json`` reads back.

    Its ``settings`` (with defaults resolved), the options that change only speed, and ``extra``;
    values left unset are left out, so they resolve again as they did here.
    """
    speed = {"device": train.device, "workers": data.workers, "cache": data.cache, "compile": train.compile,
             "channels_last": train.channels_last, "keep_checkpoints": train.keep_checkpoints}
    options = json.loads(json.dumps({**settings, **speed, **extra}, default=str))
    return {key: value for key, value in options.items() if value is not None and key not in drop}


def _weights_option(bb: BackboneOptions) -> str | None:
    """``--weights`` as a record gives it back: ``pkg:NAME`` as given, a file by its absolute path."""
    if bb.weights is None or str(bb.weights).startswith(PKG_PREFIX):
        return None if bb.weights is None else str(bb.weights)
    return str(Path(bb.weights).resolve())


def _drop_resume_files(stage_dir: Path, train: TrainOptions) -> None:
    """A finished stage's ``model.safetensors`` is all that later stages read: its checkpoint (weights and
    optimiser state, for --resume) and best-epoch copy go, unless ``keep_checkpoints``."""
    if train.keep_checkpoints or not dist.is_main():
        return
    for name in (CHECKPOINT, BEST):
        (stage_dir / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- prune
@_one_writer(create=False)
def prune(run: Path, *, threshold: float = defaults.THRESHOLD, drop_blocks: int = 0, overwrite: bool = False,
          callbacks: Callbacks | None = None) -> dict:
    """Drop low-attention proxies and the K weakest blocks, then everything orphaned (stage 3)."""
    cb = callbacks or Callbacks()
    run_meta = read_run(run)
    tailor_dir = require_stage(run, "tailor", "prune")
    student, meta = load_student(tailor_dir, torch.device("cpu"))
    alphas = [a.tolist() if a is not None else [] for a in student.attention()]
    result = plan_pruning(student.structure, alphas, threshold=threshold, drop_blocks=drop_blocks)
    if stage_done(run, "prune") and not overwrite:
        raise RunError(f"'{run}' is already pruned; pass --overwrite to prune again (this also discards 'finetune')")
    prepare_stage(run, "prune", resume=False, overwrite=True)
    img_size = run_meta["data"]["img_size"]
    before = {"params": student_params(student), "macs": student_macs(student, img_size).total,
              "structure": student.structure.counts()}
    student.prune_(result.structure)
    after = {"params": student_params(student), "macs": student_macs(student, img_size).total,
             "structure": student.structure.counts()}
    arch = run_meta["backbone"]["architecture"]
    write_safetensors(run / "prune" / MODEL, student.state_dict(), _student_meta(student, arch, "prune"))
    summary = {
        "stage": "prune", "threshold": threshold, "drop_blocks": drop_blocks,
        "removed_proxies": [{"layer": l, "source": s} for l, s in result.removed_proxies],
        "removed_blocks": result.removed_blocks, "free_blocks": result.free_blocks, "orphaned": result.orphaned,
        "fixpoint_rounds": result.rounds,
        "before": before, "after": after, "tailor_val_acc": read_summary(run, "tailor")["val_acc"],
        "structure": after["structure"], "params": after["params"], "macs": after["macs"],
        "attention": [a.tolist() if a is not None else None for a in student.attention()],
    }
    write_summary(run, "prune", summary)
    cb.on_message(
        f"prune: kept {after['structure']['blocks']}/{before['structure']['blocks']} blocks and "
        f"{after['structure']['proxies']}/{before['structure']['proxies']} proxies; "
        f"MACs {before['macs'] / 1e6:.1f}M -> {after['macs'] / 1e6:.1f}M"
    )
    return summary


# --------------------------------------------------------------------------- finetune
@_one_writer(create=False)
def finetune(run: Path, data: DataOptions, train: TrainOptions, *, teacher_weight: float = defaults.TEACHER_WEIGHT,
             callbacks: Callbacks | None = None) -> dict:
    """Retrain the pruned student with the complexity weight 0, teacher term on (stage 4)."""
    cb = callbacks or Callbacks()
    train.validate()
    device = resolve_device(train.device)
    run_meta = read_run(run)
    prune_dir = require_stage(run, "prune", "finetune")
    _check_run_data(run, run_meta, data)
    settings = stage_settings(train, device, data, run_meta=run_meta, teacher_weight=teacher_weight)
    done = prepare_stage(run, "finetune", resume=train.resume, overwrite=train.overwrite, settings=settings)
    if done:
        cb.on_message(f"finetune: already complete in {run}")
        return read_summary(run, "finetune")
    task = _load_data(run_meta, data, _data_config(run_meta["backbone"]["architecture"]), run, train.seed)
    _say_skipped(cb, task)
    student, _ = load_student(prune_dir, device)
    teacher = None
    if teacher_weight > 0:
        teacher = load_teacher(locate_teacher(run, run_meta), device).eval().requires_grad_(False)
    return _fit_student(run, "finetune", student, teacher, task, data, train, device, cb, complexity=None,
                        g1=0.0, g2=teacher_weight, teacher_loss=tailored_teacher_loss(run),
                        extra={"settings": settings, "teacher_weight": teacher_weight, "command": "finetune",
                               "options": _options(settings, train, data, drop=_RUN_DATA)})


def check_run_resume(run_dir: Path, threshold: float, drop_blocks: int | None, tolerance: float,
                     max_macs: float | None, search_epochs: int) -> None:
    """``run --resume`` keeps a finished prune (or K search) only if it was made with the same options."""
    if not stage_done(run_dir, "prune"):
        return
    pruned = read_summary(run_dir, "prune")
    frontier = run_dir / "search" / "frontier.json"
    search = read_json(frontier, what="search frontier") if frontier.is_file() else None
    diffs = []
    if pruned.get("threshold") != threshold:
        diffs.append(f"--threshold {pruned.get('threshold')} -> {threshold}")
    if drop_blocks is not None:
        if search is not None:
            diffs.append(f"K was searched (K={search.get('chosen_k')}) -> --drop-blocks {drop_blocks}")
        elif pruned.get("drop_blocks") != drop_blocks:
            diffs.append(f"--drop-blocks {pruned.get('drop_blocks')} -> {drop_blocks}")
    elif search is None:
        diffs.append(f"--drop-blocks {pruned.get('drop_blocks')} -> K searched")
    else:
        was_budget = search.get("mode") == "budget" and isinstance(search.get("max_macs"), (int, float))
        was = f"--max-macs {search['max_macs'] / 1e6:.2f}M MACs" if was_budget else f"--tolerance {search.get('tolerance')}"
        if max_macs is not None:
            full = search.get("full_macs") or 0
            budget = max_macs * full if max_macs <= 1 else max_macs
            if not was_budget or abs(search["max_macs"] - budget) > 1e-6 * max(budget, 1):
                diffs.append(f"{was} -> --max-macs {budget / 1e6:.2f}M MACs")
        elif was_budget or search.get("tolerance") != tolerance:
            diffs.append(f"{was} -> --tolerance {tolerance}")
        if search.get("search_epochs") != search_epochs:
            diffs.append(f"--search-epochs {search.get('search_epochs')} -> {search_epochs}")
    if diffs:
        raise UsageError(f"'{run_dir}' was pruned with other options ({'; '.join(diffs)}); rerun with them to resume, "
                         "or pass --overwrite to start again")


# --------------------------------------------------------------------------- automatic architecture
@dataclass
class SearchOptions:
    tolerance: float = defaults.TOLERANCE  # accuracy points below the teacher's validation accuracy
    max_macs: float | None = None  # absolute MACs, or a fraction of the full network when <= 1
    search_epochs: int = defaults.SEARCH_EPOCHS
    threshold: float = defaults.THRESHOLD

    def validate(self) -> None:
        if not 0.0 <= self.threshold < 1.0:
            raise UsageError(f"--threshold must be in [0, 1), got {self.threshold}")
        if self.tolerance < 0:
            raise UsageError(f"--tolerance must be >= 0, got {self.tolerance}")
        if self.search_epochs <= 0:
            raise UsageError(f"--search-epochs must be positive, got {self.search_epochs}")
        if self.max_macs is not None and not self.max_macs > 0:
            raise UsageError(f"--max-macs must be positive, got {self.max_macs}")


@_one_writer(create=False)
def auto_prune(run: Path, data: DataOptions, search_train: TrainOptions, final_train: TrainOptions,
               opts: SearchOptions, *, teacher_weight: float = defaults.TEACHER_WEIGHT, overwrite: bool = False,
               callbacks: Callbacks | None = None) -> dict:
    """Choose K (blocks to drop) automatically, then prune and fine-tune the chosen network fully.

    Every K is pruned in memory first (no training): K values that give the same network (blocks
    the attention left under ``threshold`` are dropped whatever K, see :mod:`tailor_cli.pruning`)
    are one candidate. Each candidate tried is fine-tuned ``search_epochs`` under ``run/search/kK``.

    Tolerance mode: the reference is the least pruned candidate, fine-tuned the same
    ``search_epochs`` (candidates and reference compared at equal training). A candidate is
    accepted when it is within ``tolerance`` points of the reference on the validation split,
    allowing for the noise of the paired difference (:func:`tailor_cli.selection.compare`), and
    the leanest accepted one is found by bisection over the candidates. Budget mode
    (``max_macs``): the least pruned candidate whose MACs fit the budget. The chosen network is
    then fine-tuned ``final_train.epochs`` and compared with the teacher the same way (exit 7
    when it misses). Only validation data is read; ``run/search/frontier.json`` lists every K.
    """
    from .data import make_loader
    from .selection import compare
    from .train import correct_mask

    cb = callbacks or Callbacks()
    t0 = time.perf_counter()
    search_train.validate()
    final_train.validate()
    opts.validate()
    run_meta = read_run(run)
    tailor_dir = require_stage(run, "tailor", "prune --auto")
    if stage_done(run, "prune") and not overwrite:
        raise RunError(f"'{run}' is already pruned; pass --overwrite to search again (this also discards 'finetune')")
    _check_run_data(run, run_meta, data)
    device = resolve_device(search_train.device)
    student, _ = load_student(tailor_dir, torch.device("cpu"))
    num_blocks = sum(s.block for s in student.structure.layers)
    alphas = [a.tolist() if a is not None else [] for a in student.attention()]
    img_size = int(run_meta["data"]["img_size"])
    t_dir = locate_teacher(run, run_meta)
    teacher_acc = read_summary(t_dir.parent, "teacher")["val_acc"]
    full_macs = model_macs(timm.create_model(run_meta["backbone"]["architecture"], pretrained=False,
                                             num_classes=len(run_meta["classes"])), img_size)
    budget = None
    if opts.max_macs is not None:
        budget = opts.max_macs * full_macs if opts.max_macs <= 1 else opts.max_macs

    # Structure and MACs of every K cost no training: prune in memory and count.
    plans: dict[int, dict] = {}
    seen: dict[str, int] = {}  # structure -> the first K that gives it
    for k in range(num_blocks + 1):
        try:
            res = plan_pruning(student.structure, alphas, threshold=opts.threshold, drop_blocks=k)
        except UsageError:
            plans[k] = {"k": k, "status": "disconnected"}
            continue
        key = repr(res.structure.to_json())
        if key in seen:
            plans[k] = {**{f: plans[seen[key]][f] for f in ("blocks_kept", "proxies_kept", "params", "macs")},
                        "k": k, "status": "same", "same_as": seen[key]}
            continue
        seen[key] = k
        pruned = copy.deepcopy(student)  # the tailored student is read once; each K prunes a copy
        pruned.prune_(res.structure)
        plans[k] = {"k": k, "status": "untried", "structure": res.structure, "blocks_kept": res.structure.counts()["blocks"],
                    "proxies_kept": res.structure.counts()["proxies"], "params": student_params(pruned)["total"],
                    "macs": student_macs(pruned, img_size).total, "free_blocks": len(res.free_blocks)}
    candidates = [k for k in plans if plans[k]["status"] == "untried"]
    if not candidates:
        t = connecting_threshold(student.structure, alphas, threshold=opts.threshold, drop_blocks=0)
        raise UsageError(f"every K disconnects the classifier at --threshold {opts.threshold}; "
                         + (f"--threshold {t:g} or lower keeps it connected" if t is not None else "lower it"))
    task = _load_data(run_meta, data, _data_config(run_meta["backbone"]["architecture"]), run, search_train.seed)
    teacher = load_teacher(t_dir, device).eval().requires_grad_(False) if teacher_weight > 0 else None
    val_loader = make_loader(task.val, batch_size=max(search_train.batch_size, 64), train=False, device=device,
                             num_workers=0)
    cfg = search_train.config(device)
    amp = autocast_context(cfg, device)
    correct: dict[int, torch.Tensor] = {}

    def evaluate_k(k: int) -> float:
        row = plans[k]
        if row["status"] == "tried":
            return row["val_acc"]
        cand = copy.deepcopy(student)
        cand.prune_(row["structure"])
        stage = f"search/k{k}"
        shutil.rmtree(run / stage, ignore_errors=True)
        opts_k = TrainOptions(**{**asdict(search_train), "epochs": opts.search_epochs, "resume": False})
        summary = _fit_student(run, stage, cand, teacher, task, data, opts_k, device, cb, complexity=None, g1=0.0,
                               g2=teacher_weight, teacher_loss=tailored_teacher_loss(run), extra={"search_k": k},
                               keep="last", held_out=False)
        trained, _ = load_student(run / stage, device)
        correct[k] = correct_mask(trained, val_loader, device, amp_ctx=amp, channels_last=cfg.channels_last)
        if not search_train.keep_checkpoints:  # compared: its record stays, its weights are not used again
            dist.barrier()
            if dist.is_main():
                (run / stage / MODEL).unlink()
        row.update(status="tried", val_acc=summary["val_acc"])
        cb.on_message(f"search: K={k} keeps {row['blocks_kept']}/{num_blocks} blocks, "
                      f"{row['macs'] / 1e6:.1f}M MACs, val_acc {row['val_acc']:.2f} (teacher {teacher_acc:.2f})")
        return row["val_acc"]

    reference = min(candidates)  # the least pruned network, at the same training as every candidate
    if budget is not None:
        fits = [k for k in candidates if plans[k]["macs"] <= budget]
        if not fits:
            raise UsageError(f"no network fits --max-macs {budget / 1e6:.1f}M (the leanest needs "
                             f"{min(plans[k]['macs'] for k in candidates) / 1e6:.1f}M)")
        chosen = min(fits)  # fewest blocks dropped under the budget: the most accurate
        evaluate_k(chosen)
    else:
        evaluate_k(reference)
        plans[reference]["comparison"] = compare(correct[reference], correct[reference],
                                                 tolerance=opts.tolerance).to_json()

        def accepted(k: int) -> bool:
            evaluate_k(k)
            result = compare(correct[k], correct[reference], tolerance=opts.tolerance)
            plans[k]["comparison"] = result.to_json()
            return result.accepted

        lo, hi, chosen = 1, len(candidates) - 1, reference  # candidates[0] is the reference: accepted
        while lo <= hi:  # the leanest accepted candidate, assuming acceptance falls as K grows
            mid = (lo + hi) // 2
            if accepted(candidates[mid]):
                chosen, lo = candidates[mid], mid + 1
            else:
                hi = mid - 1
    tried = [plans[k] for k in sorted(plans) if plans[k]["status"] == "tried"]
    frontier = []
    for k in sorted(plans):
        row = {key: value for key, value in plans[k].items() if key != "structure"}
        row["macs_fraction"] = row["macs"] / full_macs if "macs" in row else None
        row["within_tolerance"] = row["comparison"]["accepted"] if "comparison" in row else None
        row["chosen"] = k == chosen
        frontier.append(row)
    search = {"mode": "budget" if budget is not None else "tolerance", "tolerance": opts.tolerance,
              "max_macs": budget, "teacher_val_acc": teacher_acc, "full_macs": full_macs, "chosen_k": chosen,
              "reference_k": reference if budget is None else None, "val_images": len(task.val),
              "candidates_tried": len(tried), "k_values": len(plans), "distinct_networks": len(candidates),
              "search_epochs": opts.search_epochs, "wall_seconds": round(time.perf_counter() - t0, 1),
              "frontier": frontier}
    write_json(run / "search" / "frontier.json", search)
    cb.on_message(f"search: tried {len(tried)} of {len(candidates)} distinct networks ({len(plans)} K values); "
                  f"chose K={chosen}")

    pruned = prune(run, threshold=opts.threshold, drop_blocks=chosen, overwrite=True, callbacks=cb)
    final = finetune(run, data, final_train, teacher_weight=teacher_weight, callbacks=cb)
    final_model, _ = load_student(run / "finetune", device)
    teacher_model = teacher if teacher is not None else load_teacher(t_dir, device).eval()
    check = compare(correct_mask(final_model, val_loader, device, amp_ctx=amp, channels_last=cfg.channels_last),
                    correct_mask(teacher_model, val_loader, device, amp_ctx=amp, channels_last=cfg.channels_last),
                    tolerance=opts.tolerance)
    within = check.accepted
    search.update(final_val_acc=final["val_acc"], final_test_acc=final.get("test_acc"), within_tolerance=within,
                  final_vs_teacher=check.to_json())
    write_json(run / "search" / "frontier.json", search)
    result = {"stage": "finetune", "run": str(run), "search": search, "prune": pruned, **final}
    if budget is None and not within:
        result["error"] = (f"the chosen network (K={chosen}) reaches {final['val_acc']:.2f}% on validation, "
                           f"{-check.diff:.2f} points below the teacher's {teacher_acc:.2f}%: more than --tolerance "
                           f"{opts.tolerance} plus the noise of {check.n} validation images ({check.margin:.2f})")
    return result


# --------------------------------------------------------------------------- the whole pipeline
def run_pipeline(run: Path, export_dir: Path | None, bb: BackboneOptions, data: DataOptions, opts: TailorOptions,
                 tailor_train: TrainOptions, finetune_train: TrainOptions, search: SearchOptions,
                 drop_blocks: int | None = None, *, resume: bool = False, overwrite: bool = False,
                 callbacks: Callbacks | None = None) -> dict:
    """``nettailor run``: teacher (``opts.teacher_train``), tailor, the K search (or K = ``drop_blocks``),
    finetune, export to ``export_dir`` (default ``run/export``), and the report of the run.

    Every option of every stage, the export directory and K against the backbone's blocks are
    checked before anything is trained; the export's weights, once the backbone is loaded and
    still before the first epoch. The K search's candidates train with ``finetune_train``'s batch
    size and learning rate. Returns the report with ``export``, ``wall_seconds`` and, when the
    chosen network misses the tolerance, ``error`` (exit 7).
    """
    from .adapter import check_export_target, export_task
    from .report import report_run

    cb = callbacks or Callbacks()
    t0 = time.perf_counter()
    export_dir = Path(export_dir) if export_dir is not None else run / "export"
    trains = {"teacher": opts.teacher_train, "tailor": tailor_train, "finetune": finetune_train}
    num_blocks = _check_run_options(bb, trains, opts, search, drop_blocks, export_dir, resume=resume,
                                    overwrite=overwrite)
    trains = {stage: replace(train, resume=resume) for stage, train in trains.items()}
    opts, tailor_train, finetune_train = (replace(opts, teacher_train=trains["teacher"]), trains["tailor"],
                                          trains["finetune"])

    def ready(meta: dict) -> None:  # backbone and data known, nothing trained yet
        check_export_target(export_dir, meta["backbone"], meta.get("task_name"))

    with lock_dir(run):  # one writer across all the stages (each stage locks it again)
        if resume:
            check_run_resume(run, search.threshold, drop_blocks, search.tolerance, search.max_macs, search.search_epochs)
        if overwrite:
            reset_run(run)
        searching = drop_blocks is None and not (resume and stage_done(run, "prune"))
        tries = 1 + math.ceil(math.log2(num_blocks + 1))  # the reference, then a bisection over at most L+1 networks
        cb.on_plan([("teacher", opts.teacher_train.epochs), ("tailor", tailor_train.epochs)]
                   + [("search", tries * search.search_epochs)] * searching + [("finetune", finetune_train.epochs)])
        tailor(run, bb, data, tailor_train, opts, cb, on_ready=ready)
        meta = {k: v for k, v in read_run(run).items() if k != "format"}
        write_run(run, meta | {"command": "run", "options": _run_options(bb, data, trains, opts, search, drop_blocks)})
        searched = None
        if searching:
            search_train = replace(finetune_train, epochs=search.search_epochs)
            searched = auto_prune(run, data, search_train, finetune_train, search, teacher_weight=opts.teacher_weight,
                                  overwrite=True, callbacks=cb)
        else:
            if drop_blocks is not None and not (resume and stage_done(run, "prune")):
                prune(run, threshold=search.threshold, drop_blocks=drop_blocks, overwrite=True, callbacks=cb)
            finetune(run, data, finetune_train, teacher_weight=opts.teacher_weight, callbacks=cb)
        result = report_run(run)
        result["export"] = export_task(run, export_dir, overwrite=True)
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if searched is not None and searched.get("error"):
        result["error"] = searched["error"]  # exit 7: the document says why, as prune --auto's does
    return result


def _check_run_options(bb: BackboneOptions, trains: dict[str, TrainOptions], opts: TailorOptions,
                       search: SearchOptions, drop_blocks: int | None, export_dir: Path, *, resume: bool,
                       overwrite: bool) -> int:
    """What ``run`` can check before loading data or weights; returns the backbone's number of blocks."""
    from .adapter import check_export_target
    from .pruning import validate_args

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
    check_export_target(export_dir, {"architecture": model.pretrained_cfg["architecture"]})
    return num_blocks


def _run_options(bb: BackboneOptions, data: DataOptions, trains: dict[str, TrainOptions], opts: TailorOptions,
                 search: SearchOptions, drop_blocks: int | None) -> dict:
    """``run``'s options under its own names, recorded in ``run.json``: ``nettailor run -c RUN/run.json`` repeats it."""
    common = trains["tailor"]
    options = {"data": _data_path(data.data) if data.data else None, "task": data.task, "img_size": data.img_size,
               "val_fraction": data.val_fraction, "hflip": data.hflip, "skip_bad": data.skip_bad,
               "cache": data.cache, "workers": data.workers, "backbone": bb.name, "pretrained": bb.pretrained,
               "weights": _weights_option(bb),
               "max_skip": opts.max_skip, "teacher_loss": opts.teacher_loss, "threshold": search.threshold,
               "drop_blocks": drop_blocks, "tolerance": search.tolerance, "max_macs": search.max_macs,
               "search_epochs": search.search_epochs, "seed": common.seed, "device": common.device,
               "amp": common.amp, "keep_checkpoints": common.keep_checkpoints}
    for stage, train in trains.items():
        options |= {f"{stage}_epochs": train.epochs, f"{stage}_lr": train.lr, f"{stage}_batch_size": train.batch_size}
    return {key: value for key, value in options.items() if value is not None}
