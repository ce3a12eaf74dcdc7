"""The datasets handed to the trainer, and :class:`TaskData`, the result of ``load_task_data``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.utils.data

from ..errors import DataError
from .samples import UNREADABLE, Samples, bad_image_msg


class ImageDataset(torch.utils.data.Dataset):
    """Decodes each item on access: ``prep(PIL RGB) -> uint8 (3, H, W)``, then ``post`` -> float32.

    Items: ``(float32 (3, img_size, img_size), int label)``. ``skip_bad``: the data was loaded with
    ``--skip-bad`` (so an unreadable item's message does not suggest passing it).
    """

    def __init__(self, samples: Samples, prep: Callable, post: Callable, skip_bad: bool = False):
        self.samples = samples
        self.prep = prep
        self.post = post
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return self.samples.labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            img = self.samples.load(i)
        except UNREADABLE as e:
            raise DataError(bad_image_msg(self.samples.describe(i), e, self.skip_bad)) from None
        return self.post(self.prep(img)), self.samples.labels[i]


class CachedImageDataset(torch.utils.data.Dataset):
    """Images decoded and resized once: ``images`` uint8 ``(N, 3, H, W)``, ``targets`` int64 ``(N,)``.

    ``transform`` maps one uint8 ``(3, H, W)`` tensor to float32 ``(3, img_size, img_size)``.
    Picklable (plain tensors), so DataLoader workers can share it.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform: Callable,
                 keys: list[str | int] | None = None):
        self.images = images
        self.targets = targets
        self.transform = transform
        self.keys = keys

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    @property
    def labels(self) -> list[int]:
        return self.targets.tolist()

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.targets[i])


@dataclass
class TaskData:
    """A task's splits and the preprocessing used to build them.

    Dataset items are ``(image, label)``: ``image`` float32 ``(3, img_size, img_size)`` normalised
    with ``mean``/``std``, ``label`` an ``int`` in ``[0, len(classes))``.
    """

    name: str
    layout: str
    classes: list[str]
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset | None
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    hflip: bool
    skipped: list[str] = field(default_factory=list)
    crop_mode: str = "center"
    cached: bool = False
    split: str = "given"  # "given" (by the data) | "made" | "created" (written to split_file) | "loaded"
    source: str = ""  # resolved path, "embedded" or "torchvision:NAME"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> dict:
        """JSON-able facts about the data (no tensors)."""
        return {
            "name": self.name,
            "layout": self.layout,
            "source": self.source,
            "classes": len(self.classes),
            "train": len(self.train),  # type: ignore[arg-type]
            "val": len(self.val),  # type: ignore[arg-type]
            "test": None if self.test is None else len(self.test),  # type: ignore[arg-type]
            "img_size": self.img_size,
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "hflip": self.hflip,
            "cached": self.cached,
            "split": self.split,
            "skipped": len(self.skipped),
            "cache_mb": round(sum(getattr(d, "nbytes", 0) for d in (self.train, self.val, self.test)) / 2**20, 1),
        }
