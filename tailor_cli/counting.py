"""Params and MACs of what actually runs (docs/method.md, "Counting").

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` on a real forward
pass at batch 1 (MACs = FLOPs / 2), so pruned modules, which never run, cost nothing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .student import Student


@torch.no_grad()
def module_flops(model: nn.Module, img_size: int) -> dict[str, int]:
    """FLOPs per module path (``""`` is the whole model) for one (1,3,S,S) input."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(1, 3, img_size, img_size, device=param.device, dtype=param.dtype)
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    root = type(model).__name__
    out = {}
    for name, ops in counter.get_flop_counts().items():
        if name == root:
            out[""] = sum(ops.values())
        elif name.startswith(root + "."):
            out[name[len(root) + 1:]] = sum(ops.values())
    out.setdefault("", counter.get_total_flops())
    return out


def model_macs(model: nn.Module, img_size: int) -> int:
    return module_flops(model, img_size)[""] // 2


@functools.lru_cache(maxsize=8)
def _full_cost(architecture: str, num_classes: int, img_size: int) -> tuple[int, int]:
    model = timm.create_model(architecture, pretrained=False, num_classes=num_classes)
    return network_params(model), model_macs(model, img_size)


def format_count(n: float) -> str:
    """``21.29M``, ``3.58G``, ``512.00K`` (the CLI's tables write counts the same way)."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def full_network(architecture: str, num_classes: int, img_size: int) -> dict[str, int]:
    """Params and MACs of the fully fine-tuned network (the teacher): the one reference every MAC and
    params share is of (the report, the K search, the stage lines)."""
    params, macs = _full_cost(architecture, num_classes, img_size)
    return {"params": params, "macs": macs}


@dataclass
class StudentCost:
    """MACs (per image) of each part of a student that runs."""

    total: int
    stem: int
    fc: int
    paths: list[list[int]]  # per layer, MACs of each path in attention order

    def layer(self, l: int) -> int:
        return sum(self.paths[l])


def student_macs(student: Student, img_size: int) -> StudentCost:
    flops = module_flops(student, img_size)
    paths = []
    for i, spec in enumerate(student.structure.layers):
        row = []
        if spec.block:
            row.append(flops.get(f"layers.{i}.block", 0) // 2)
        row += [flops.get(f"layers.{i}.proxies.{s}", 0) // 2 for s in spec.proxies]
        paths.append(row)
    return StudentCost(flops[""] // 2, flops.get("stem", 0) // 2, flops.get("fc", 0) // 2, paths)


def path_costs(student: Student, img_size: int) -> tuple[list[list[float]], int]:
    """Normalised path costs c_p = MACs(path) / MACs(stem + all blocks), and that denominator.

    Must be called on the *full* student (every block present).
    """
    cost = student_macs(student, img_size)
    if not all(spec.block for spec in student.structure.layers):
        raise ValueError("path costs are defined on the full student")
    backbone = cost.stem + sum(row[0] for row in cost.paths)
    return [[m / backbone for m in row] for row in cost.paths], backbone


def _numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def student_params(student: Student) -> dict[str, int]:
    """Unique tensors the task runs, split into shared (frozen backbone) and task-specific.

    Task-specific: proxies, attention logits, classifier, and every BN running
    statistic (the task adapts and stores its own).
    """
    shared = _numel(student.frozen_parameters())
    trainable = _numel(student.trainable_parameters())
    bn_stats = sum(
        b.numel() for name, b in student.named_buffers() if name.endswith(("running_mean", "running_var"))
    )
    return {"shared": shared, "task_specific": trainable + bn_stats, "total": shared + trainable + bn_stats,
            "trainable": trainable, "bn_stats": bn_stats}


def network_params(model: nn.Module) -> int:
    """Params of a full (fine-tuned) network, counted the same way: params + BN statistics."""
    return _numel(model.parameters()) + sum(
        b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var"))
    )
