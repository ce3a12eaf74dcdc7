"""Stage 1, teacher: fine-tune the whole backbone (new classifier) on the task."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .. import distributed as dist
from ..backbone import backbone_identity, check_backbone_name
from ..checkpoint import write_json, write_safetensors
from ..counting import model_macs, network_params
from ..errors import RunError, UsageError
from ..objectives import TeacherObjective
from ..runs import MODEL, check_writable, prepare_stage, read_run, read_summary, reset_run, write_run, write_summary
from ..train import Callbacks, evaluate, fit, resolve_device
from ..weights import WEIGHT_SUFFIXES, is_weights_name, load_finetuned_weights, read_weights_file
from .common import (
    accuracies,
    check_run_data,
    data_config,
    data_record,
    drop_resume_files,
    keep_backbone,
    load_data,
    loaders,
    maybe_compile,
    new_run_guard,
    one_writer,
    other_data,
    run_backbone,
    say_distributed,
    say_skipped,
)
from .options import BackboneOptions, DataOptions, TrainOptions, recorded_options, stage_settings, weights_option


def is_teacher_file(path: Path | None) -> bool:
    """``--teacher`` names a fine-tuned model file (not a teacher run)."""
    return path is not None and Path(path).is_file() and is_weights_name(path)


def resolve_teacher_dir(path: Path) -> Path:
    path = Path(path)
    if path.is_file():
        raise UsageError(f"--teacher '{path}' is a file but not a model file ({', '.join(WEIGHT_SUFFIXES)}); pass a "
                         "fine-tuned model's .safetensors or timm .pth, or a teacher run directory")
    if (path / "teacher" / MODEL).is_file():
        return path / "teacher"
    if (path / MODEL).is_file() and path.name == "teacher":
        return path
    raise RunError(f"'{path}' holds no finished teacher (expected {path}/teacher/{MODEL}); run `nettailor teacher` first")


def check_teacher_data(teacher_dir: Path, data: str | None) -> None:
    """Before any split is made: the teacher must have been trained on this data (a --data or a run's path)."""
    saved = read_run(teacher_dir.parent)["data"]
    if other_data(saved, data):
        raise UsageError(
            f"teacher '{teacher_dir}' was fine-tuned on '{saved.get('given') or saved['path']}', but --data is "
            f"'{data}'; pass the teacher's data, or omit --teacher to train one on this data"
        )


def check_teacher(teacher_dir: Path, backbone_id: dict, classes: list[str]) -> dict:
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


@one_writer(create=True)
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
    check_run_data(run, run_meta, data)
    settings = stage_settings(train, device, data, bb, run_meta)
    done = prepare_stage(run, "teacher", resume=train.resume, overwrite=train.overwrite, settings=settings)
    if done:
        cb.on_message(f"teacher: already complete in {run}")
        return read_summary(run, "teacher")
    with new_run_guard(run):
        check_backbone_name(bb.name)
        task = load_data(run_meta, data, data_config(bb.name), run)
        model = run_backbone(run, run_meta, bb, len(task.classes), train.seed)
    say_skipped(cb, task)
    identity = backbone_identity(model, name=bb.name, weights=bb.weights, pretrained=bb.pretrained)
    if run_meta is None:
        write_run(run, {"backbone": identity, "data": data_record(task, data), "classes": task.classes,
                        "task_name": task.name})
    elif run_meta["backbone"]["sha256"] != identity["sha256"]:
        raise RunError(f"run '{run}' was made with other backbone weights; use another --output or --overwrite")
    keep_backbone(run, run_meta, model, identity)
    return fit_teacher(run, bb, model, task, data, train, device, cb, stage_settings(train, device, data, bb, read_run(run)))


def fit_teacher(run: Path, bb: BackboneOptions, model: nn.Module, task, data: DataOptions, train: TrainOptions,
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
                                           "options": recorded_options(settings, train, data, weights=weights_option(bb))})
    train_loader, val_loader = loaders(task, train.batch_size, device, train.seed, data.workers)
    say_distributed(cb, train)
    model = dist.sync_batchnorm(model, device)
    forward = maybe_compile(dist.wrap(model, device), train.compile)
    row = fit(stage="teacher", stage_dir=stage_dir, model=model, objective=TeacherObjective(model, forward, cfg.label_smoothing),
              param_groups=[{"params": list(model.parameters())}], train_loader=train_loader,
              val_loader=val_loader, device=device, cfg=cfg, resume=train.resume, callbacks=cb, keep="best")
    arch = model.pretrained_cfg["architecture"]
    write_safetensors(stage_dir / MODEL, model.state_dict(),
                      {"stage": "teacher", "architecture": arch, "num_classes": len(task.classes)})
    summary = {"stage": "teacher", **accuracies(row, model, task, train, device, cfg),
               "params": network_params(model), "macs": model_macs(model, task.img_size),
               "skipped_images": list(task.skipped), "wall_seconds": round(time.perf_counter() - t0, 1)}
    write_summary(run, "teacher", summary)
    drop_resume_files(stage_dir, train)
    dist.barrier()  # other ranks may read the teacher next
    return summary


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_teacher_file(file: Path, model: nn.Module, num_classes: int) -> nn.Module:
    """``--teacher FILE`` read into ``model`` (the backbone's architecture): safetensors, or a timm ``.pth``
    read with ``weights_only``; one that does not fit the architecture or ``num_classes`` is refused in one line."""
    load_finetuned_weights(model, read_weights_file(file), source=str(file), num_classes=num_classes)
    return model


def import_teacher(run: Path, file: Path, model: nn.Module, task, data: DataOptions, train: TrainOptions,
                   device: torch.device, cb: Callbacks, settings: dict) -> dict:
    """``--teacher FILE``: a model the user fine-tuned elsewhere becomes the run's teacher stage.

    ``model`` holds the file's weights (:func:`load_teacher_file`). Its accuracy is evaluated on the run's
    validation (and test) split and recorded in ``RUN/teacher/summary.json`` like a trained
    teacher's; its weights are stored as ``RUN/teacher/model.safetensors``, so the run no longer
    needs the file.
    """
    t0 = time.perf_counter()
    file = Path(file)
    cfg = train.config(device)
    model = model.to(device).eval()
    stage_dir = run / "teacher"
    sha = file_sha256(file)
    write_json(stage_dir / "config.json", {"stage": "teacher", "made_by": "file", "source": str(file.resolve()),
                                           "source_sha256": sha, "device": str(device), "settings": settings})
    _, val_loader = loaders(task, train.batch_size, device, train.seed, data.workers)
    val = evaluate(model, val_loader, device)["acc"]
    cb.on_message(f"teacher: {file.name} (sha256 {sha[:12]}) imported; val_acc {val:.2f}%")
    arch = model.pretrained_cfg["architecture"]
    write_safetensors(stage_dir / MODEL, model.state_dict(),
                      {"stage": "teacher", "architecture": arch, "num_classes": len(task.classes),
                       "source": str(file.resolve()), "source_sha256": sha})
    row = {"val_acc": val, "best_val_acc": val, "kept_epoch": None, "epochs_trained": 0}
    summary = {"stage": "teacher", **accuracies(row, model, task, train, device, cfg),
               "source": str(file.resolve()), "source_sha256": sha,
               "params": network_params(model), "macs": model_macs(model, task.img_size),
               "skipped_images": list(task.skipped), "wall_seconds": round(time.perf_counter() - t0, 1)}
    write_summary(run, "teacher", summary)
    dist.barrier()
    return summary
