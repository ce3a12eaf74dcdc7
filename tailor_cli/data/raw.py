"""What a layout reader returns: a task's classes and sample lists, before any split or transform."""
from __future__ import annotations

from dataclasses import dataclass, field

from .samples import Samples
from .transforms import DEFAULT_TRAIN_SCALE


@dataclass
class RawTask:
    """A task as a layout reader finds it: classes, train/val/test samples (``val`` None: we split it
    from ``train``), and what the dataset prefers (image size, crop, interpolation, crop scale)."""

    name: str
    layout: str
    classes: list[str]
    train: Samples
    val: Samples | None  # None: we make the split from ``train``
    test: Samples | None = None
    groups: list[str] | None = None  # per train item: split group (GTSRB track)
    preferred_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    scale: tuple[float, float] = DEFAULT_TRAIN_SCALE
    source: str = ""
    skipped: list[str] = field(default_factory=list)
