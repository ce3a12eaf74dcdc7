"""Rebuild the networks a stage wrote from the run directory alone (no weights file, no download).

A student's ``model.safetensors`` holds its own tensors and names the run's frozen backbone
(``RUN/frozen/backbone.safetensors``, :mod:`tailor_cli.frozen`) by sha256; one written before the run had
that file holds its frozen tensors itself, and is read as it is. Used by the stages, by export and by
the report."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from . import __version__
from .checkpoint import read_safetensors
from .distributed import decided
from .errors import RunError
from .frozen import FROZEN_KEY, attach_store, has_store, read_store, shared_tensors, write_store_tensors
from .runs import MODEL, read_run, write_run
from .student import Structure, Student


def load_teacher(teacher_dir: Path, device: torch.device) -> nn.Module:
    tensors, meta = read_safetensors(teacher_dir / MODEL, what="teacher weights")
    model = timm.create_model(meta["architecture"], pretrained=False, num_classes=int(meta["num_classes"]))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise RunError(f"teacher weights in '{teacher_dir}' do not fit '{meta['architecture']}': {str(err)[:160]}") from err
    return model.to(device)


def load_student(stage_dir: Path, device: torch.device) -> tuple[Student, dict]:
    """Rebuild a student of any stage from its ``model.safetensors`` and the run's frozen backbone."""
    path = Path(stage_dir) / MODEL
    tensors, meta = read_safetensors(path, what="student weights")
    for key in ("architecture", "num_classes", "structure", "max_skip"):
        if key not in meta:
            raise RunError(f"'{path}' lacks '{key}' in its metadata; it is not a student")
    backbone = timm.create_model(meta["architecture"], pretrained=False, num_classes=0)
    student = Student(backbone, int(meta["num_classes"]), max_skip=int(meta["max_skip"]),
                      train_bn=bool(meta.get("train_bn", False)),
                      structure=Structure.from_json(meta["structure"]))
    frozen = meta.get(FROZEN_KEY)
    if isinstance(frozen, dict) and isinstance(frozen.get("file"), str) and isinstance(frozen.get("sha256"), str):
        attach_store(student, tensors, read_store(Path(stage_dir) / frozen["file"], frozen["sha256"]), path)
    elif frozen is not None:
        raise RunError(f"'{path}' names its frozen backbone in a form this nettailor does not read; rerun the stage")
    else:  # written before runs stored their frozen backbone once: the file holds it
        try:
            student.load_state_dict(tensors)
        except RuntimeError as err:
            raise RunError(f"student weights in '{stage_dir}' do not fit their structure: {str(err)[:160]}") from err
    return student.to(device), meta


def student_meta(student: Student, architecture: str, stage: str) -> dict:
    return {"stage": stage, "architecture": architecture, "num_classes": student.num_classes,
            "max_skip": student.max_skip, "train_bn": student.train_bn, "structure": student.structure.to_json(),
            "nettailor": __version__}


def ensure_store(run: Path) -> None:
    """Give a run written before runs stored their frozen backbone once its ``RUN/frozen/backbone.safetensors``,
    from its tailored student (whose file holds every frozen tensor), so later stages write lean files.

    Called by the stages that write student files (holding the run's lock); a no-op on newer runs.
    """
    run = Path(run)
    if decided(lambda: has_store(run)):  # under torchrun every rank takes the same branch
        return
    meta = read_run(run)
    ident = meta["backbone"]
    student, _ = load_student(run / "tailor", torch.device("cpu"))
    write_store_tensors(run, shared_tensors(student), ident["sha256"], ident["architecture"])  # rank 0 writes
    write_run(run, {k: v for k, v in meta.items() if k != "format"})  # now in the current format (a barrier)
