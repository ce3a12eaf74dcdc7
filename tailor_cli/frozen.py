"""The frozen backbone, stored once per run directory, and the student files that build on it.

    RUN/frozen/backbone.safetensors  the frozen parameters: stem, every block, tail and head, timm names,
                                     no classifier; as it is, an export directory's shared backbone
    RUN/frozen/stats.safetensors     the pretrained BatchNorm statistics, which the teacher and the
                                     student start from

A student's stage file (``tailor/``, ``prune/``, ``finetune/``, ``search/kK/``), its best-epoch copy and
its training checkpoint hold only the student's own tensors: proxies, attention logits, classifier and
every BatchNorm statistic (:func:`task_tensors`). Their metadata names the frozen tensors they build on
(``"frozen"``: the store's path relative to the file's folder and its sha256, the run's backbone sha256
as ``run.json`` records it), and reading one checks the store against that sha256. Files written before
the store existed hold their frozen tensors themselves and are read as they are (``loading.py``).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import timm
import torch
from torch import nn

from .backbone import backbone_tensors, tensors_sha256, zero_classifier
from .checkpoint import read_safetensors, write_safetensors
from .errors import RunError
from .student import Student

STORE = "frozen/backbone.safetensors"
STATS = "frozen/stats.safetensors"
FROZEN_KEY = "frozen"  # the metadata entry of a student file that names the store it builds on


def frozen_keys(student: Student) -> set[str]:
    """The student's state-dict keys of shared frozen parameters (stored once, in the run's store)."""
    return {k for k, _ in student.named_parameters() if student.timm_name(k) is not None}


def shared_tensors(student: Student) -> dict[str, torch.Tensor]:
    """The student's frozen parameters under their timm names (stem, its blocks, tail, head)."""
    named = ((student.timm_name(k), v) for k, v in student.named_parameters())
    return {name: v.detach() for name, v in named if name is not None}


def task_tensors(student: Student) -> dict[str, torch.Tensor]:
    """Everything in the student's state dict that is not a shared frozen parameter."""
    frozen = frozen_keys(student)
    return {k: v for k, v in student.state_dict().items() if k not in frozen}


def backbone_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """A timm model's persistent buffers (BatchNorm statistics) outside its classifier, timm names."""
    classifier = model.pretrained_cfg.get("classifier", "fc")
    params = {k for k, _ in model.named_parameters()}
    return {k: v.detach() for k, v in model.state_dict().items()
            if k not in params and not k.startswith(classifier + ".")}


# --------------------------------------------------------------------------- the store
def has_store(run: Path) -> bool:
    """Whether the run keeps its frozen parameters in ``RUN/frozen/backbone.safetensors``."""
    return (Path(run) / STORE).is_file()


def write_store(run: Path, model: nn.Module, sha256: str) -> None:
    """Store a freshly built backbone's frozen parameters and pretrained statistics in ``run`` (before any training)."""
    tensors = backbone_tensors(model)
    if tensors_sha256(tensors) != sha256:
        raise RunError(f"the backbone's tensors do not match the sha256 {sha256[:12]} that '{run}' records")
    architecture = model.pretrained_cfg.get("architecture")
    write_safetensors(Path(run) / STATS, backbone_stats(model), {"architecture": architecture, "sha256": sha256})
    write_safetensors(Path(run) / STORE, tensors, {"sha256": sha256, "architecture": architecture})


def write_store_tensors(run: Path, tensors: dict[str, torch.Tensor], sha256: str, architecture: str) -> None:
    """Store frozen parameters taken from a student (a run written before the store existed); no statistics."""
    if tensors_sha256(tensors) != sha256:
        raise RunError(f"the frozen tensors of '{run}' do not match its recorded sha256 {sha256[:12]}; the run is corrupt")
    write_safetensors(Path(run) / STORE, tensors, {"sha256": sha256, "architecture": architecture})


def read_store(path: Path, sha256: str) -> dict[str, torch.Tensor]:
    """The frozen parameters in ``path``, checked against ``sha256`` (read and hashed once while the file is unchanged)."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"'{path}' is missing: the run's frozen backbone, which its stage files build on; copy the "
                       "whole run directory (or rerun it)")
    stat = path.stat()
    return _read_store(str(path.resolve()), stat.st_mtime_ns, stat.st_size, stat.st_ino, sha256)


@functools.lru_cache(maxsize=1)  # one run at a time: the store of the run at hand
def _read_store(path: str, mtime_ns: int, size: int, inode: int, sha256: str) -> dict[str, torch.Tensor]:
    tensors, _ = read_safetensors(Path(path), what="frozen backbone")
    found = tensors_sha256(tensors)
    if found != sha256:
        raise RunError(f"frozen backbone '{path}' has sha256 {found[:12]}, but the run's files build on {sha256[:12]}; "
                       "it was modified or damaged: restore it from a copy of the run, or rerun the run")
    return tensors


def frozen_record(run: Path, folder: Path, sha256: str) -> dict:
    """What a student file in ``folder`` records about the store it builds on."""
    return {"file": os.path.relpath(Path(run) / STORE, folder), "sha256": sha256}


def save_student(run: Path, folder: Path, name: str, student: Student, meta: dict, sha256: str) -> None:
    """Write ``student``'s own tensors to ``folder/name``, naming the run's store (which must exist)."""
    if not has_store(run):
        raise RunError(f"'{run}' has no {STORE} to build on; rerun its tailor stage")
    write_safetensors(Path(folder) / name, task_tensors(student),
                      {**meta, FROZEN_KEY: frozen_record(run, Path(folder), sha256)})


def attach_store(student: Student, tensors: dict[str, torch.Tensor], store: dict[str, torch.Tensor],
                 where: Path | str) -> None:
    """Load a student file's own ``tensors`` and the frozen parameters from ``store`` into ``student`` (strict)."""
    frozen = {k: str(student.timm_name(k)) for k in frozen_keys(student)}
    extra = sorted(set(tensors) - (set(student.state_dict()) - set(frozen)))
    missing = sorted(name for name in frozen.values() if name not in store)
    if extra or missing:
        raise RunError(f"'{where}' does not fit its structure and frozen backbone "
                       f"({len(extra)} unexpected, {len(missing)} frozen tensors missing, e.g. {(extra or missing)[0]}); "
                       "rerun the stage")
    state = {**tensors, **{k: store[name] for k, name in frozen.items()}}
    try:
        student.load_state_dict(state)
    except RuntimeError as err:
        raise RunError(f"student weights in '{where}' do not fit their structure: {str(err)[:160]}") from err


def backbone_from_store(run: Path, name: str, sha256: str, num_classes: int, seed: int) -> nn.Module:
    """The run's backbone rebuilt from its store alone (no weights file, no download): the same network,
    classifier (zeros) and generator state after it as ``create_backbone`` with ``seed`` gives."""
    run = Path(run)
    params = read_store(run / STORE, sha256)
    stats, _ = read_safetensors(run / STATS, what="pretrained statistics")
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    model.reset_classifier(num_classes)
    zero_classifier(model.get_classifier())
    missing, unexpected = model.load_state_dict({**params, **stats}, strict=False)
    classifier = model.pretrained_cfg.get("classifier", "fc")
    missing = [k for k in missing if not k.startswith(classifier + ".")]
    if missing or unexpected:
        raise RunError(f"the frozen backbone in '{run}' does not fit '{name}' ({len(missing)} missing, {len(unexpected)} "
                       "unexpected tensors); rerun the run")
    return model


def can_build_from_store(run: Path) -> bool:
    """Whether the run holds all a teacher or student needs to start from (parameters and statistics)."""
    return has_store(run) and (Path(run) / STATS).is_file()
