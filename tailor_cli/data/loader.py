"""DataLoaders tuned for the device."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.utils.data


def default_num_workers(device: torch.device) -> int:
    """DataLoader worker processes for ``device``.

    Accelerators (cuda/mps/xpu): ``min(8, cpus - 1)``: the GPU does the compute, the CPUs feed it.
    CPU: ``min(4, (cpus - 2) // 2)`` (0 on <= 3 cores): the training step itself needs the cores,
    and loading in the main process is cheap (especially with ``cache=True``).
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.device(device).type == "cpu":
        return max(0, min(4, (cpus - 2) // 2))
    return max(0, min(8, cpus - 1))


def make_loader(dataset: torch.utils.data.Dataset, *, batch_size: int, train: bool, device: torch.device,
                num_workers: int | None = None, sampler: Any = None, seed: int = 0,
                drop_last: bool | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader tuned for ``device``.

    Shuffles (train, no ``sampler``) with a ``torch.Generator`` seeded by ``seed`` (also seeds the
    workers' RNGs, so augmentation is reproducible with workers; with 0 workers augmentation uses the
    global torch/python RNGs). Workers are persistent with ``prefetch_factor=4``; memory is pinned on
    CUDA. ``drop_last`` defaults to ``train`` when the dataset holds at least one full batch.
    """
    device = torch.device(device)
    nw = default_num_workers(device) if num_workers is None else max(0, int(num_workers))
    if drop_last is None:
        drop_last = bool(train) and len(dataset) >= batch_size  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    if nw > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=bool(train) and sampler is None, sampler=sampler,
        num_workers=nw, pin_memory=device.type == "cuda", drop_last=drop_last,
        generator=torch.Generator().manual_seed(int(seed)), **kwargs)
