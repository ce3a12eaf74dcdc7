"""Sample sources: lists of labelled images that hand out RGB PIL images, no transform yet.

A layout reader (:mod:`.layouts`) describes a task with them; a split is a ``subset``; the
datasets (:mod:`.datasets`) decode through them. ``open_image`` is the one way an image file is
read, by training and by serving alike.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


class Samples:
    """Abstract list of labelled images. ``keys`` are stable ids (relative paths or indices)."""

    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def key(self, i: int) -> str | int:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        return str(self.key(i))

    def load(self, i: int) -> Image.Image:
        """Return item ``i`` as an RGB PIL image (raises OSError/ValueError on bad data)."""
        raise NotImplementedError

    def subset(self, idx: Sequence[int]) -> "Samples":
        raise NotImplementedError


# What reading an image file can raise: PIL's errors for a damaged or unknown file (UnidentifiedImageError
# is an OSError; truncated files: OSError, SyntaxError or ValueError) and its refusal of a "decompression
# bomb" (an image of more than twice Image.MAX_IMAGE_PIXELS), which is none of these.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def open_image(path: Path) -> Image.Image:
    """An image file as RGB, exactly as training and validation read it (16-bit, palette, CMYK...).

    Raises one of ``UNREADABLE`` for a file that cannot be read.
    """
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, P, RGBA, I;16, CMYK...) -> RGB. Transparency is composited on black."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = max(arr.max(), 1.0)
        img = Image.fromarray(np.clip(arr * (255.0 / (65535.0 if hi > 255 else 255.0)), 0, 255).astype(np.uint8))
    if img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    return img.convert("RGB")


class FileSamples(Samples):
    """Image files ``root / rel`` with integer labels."""

    def __init__(self, root: Path, rels: list[str], labels: list[int]):
        self.root = Path(root)
        self.rels = list(rels)
        self.labels = list(labels)

    def key(self, i: int) -> str:
        return self.rels[i]

    def path(self, i: int) -> Path:
        return self.root / self.rels[i]

    def load(self, i: int) -> Image.Image:
        return open_image(self.path(i))

    def subset(self, idx: Sequence[int]) -> "FileSamples":
        return FileSamples(self.root, [self.rels[i] for i in idx], [self.labels[i] for i in idx])


class ArraySamples(Samples):
    """Items ``images[index[i]]`` of an in-memory uint8 array ``(N, H, W)`` or ``(N, H, W, 3)``."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], index: Sequence[int] | None = None):
        self.images = images
        self.labels = [int(x) for x in labels]
        self.index = list(range(len(images))) if index is None else list(index)

    def key(self, i: int) -> int:
        return self.index[i]

    def load(self, i: int) -> Image.Image:
        return _to_rgb(Image.fromarray(self.images[self.index[i]]))

    def subset(self, idx: Sequence[int]) -> "ArraySamples":
        return ArraySamples(self.images, [self.labels[i] for i in idx], [self.index[i] for i in idx])


class DatasetSamples(Samples):
    """Items ``base[index[i]]`` of a dataset returning ``(PIL image, label)`` (torchvision)."""

    def __init__(self, base: Any, index: Sequence[int], labels: Sequence[int], prefix: str = ""):
        self.base = base
        self.index = list(index)
        self.labels = [int(x) for x in labels]
        self.prefix = prefix

    def key(self, i: int) -> int:
        return self.index[i]

    def describe(self, i: int) -> str:
        return f"{self.prefix}#{self.index[i]}"

    def load(self, i: int) -> Image.Image:
        img = self.base[self.index[i]][0]
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        return _to_rgb(img)

    def subset(self, idx: Sequence[int]) -> "DatasetSamples":
        return DatasetSamples(self.base, [self.index[i] for i in idx], [self.labels[i] for i in idx], self.prefix)


def bad_image_msg(name: str, err: BaseException, skip_bad: bool = False) -> str:
    """One-line message for an unreadable image; ``skip_bad``: --skip-bad was given (do not suggest it)."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    if skip_bad:
        return (f"cannot read image {name} ({reason}): it is truncated or not an image and was not skipped "
                f"(--skip-bad skips the image files that fail to decode before training); replace or delete it")
    return (f"cannot read image {name} ({reason}): it is truncated or not an image; "
            f"replace or delete it, or pass --skip-bad to skip unreadable images")


def is_image(p: Path) -> bool:
    return p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".")


def subdirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def images_in(folder: Path) -> list[Path]:
    """All image files below ``folder`` (recursive), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p))
