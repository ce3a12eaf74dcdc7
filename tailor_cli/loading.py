"""Rebuild the networks a stage wrote from their ``model.safetensors`` alone (no download needed).

Used by the stages, by export and by the report."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from . import __version__
from .checkpoint import read_safetensors
from .errors import RunError
from .runs import MODEL
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


def student_meta(student: Student, architecture: str, stage: str) -> dict:
    return {"stage": stage, "architecture": architecture, "num_classes": student.num_classes,
            "max_skip": student.max_skip, "structure": student.structure.to_json(), "nettailor": __version__}
