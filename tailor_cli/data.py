"""Task data: find a dataset on disk, split it, and build timm-style transforms and loaders.

Supported ``data`` values (``load_task_data`` detects the layout and records it in ``TaskData.layout``):

* ``"digits"``: the embedded 8x8 UCI digits (package asset), always in memory; a fixed 20% of
  each class (359 images) is the test split, validation is carved from the other 1,438.
* ``imagefolder``: ``data/train/<class>/*`` plus ``data/val/`` (or ``valid/``) and ``data/test/``, each
  optional. Without a val folder we carve the validation split from ``train/``; ``test/`` is only
  ever evaluated and reported, never used for a choice.
* ``imagefolder-flat``: ``data/<class>/*``; we make a stratified, seeded validation split.
* ``gtsrb``: torchvision's GTSRB layout (``GTSRB/Training/000NN/*.ppm`` + per-class CSV,
  ``GTSRB/Final_Test/Images`` + ``GT-final_test.csv``); the validation split is made BY TRACK.
* ``decathlon``: Visual Decathlon (``annotations/<task>_{train,val}.json`` + ``data/``), needs ``task``.
* ``torchvision:NAME``: a ``torchvision.datasets`` dataset (downloaded only with ``download=True``).

Splits that we make (flat, train-only imagefolder, gtsrb, digits, torchvision sets without a val
split) are stratified per class and seeded. With ``split_file`` they are written once (atomically)
and re-read exactly by every later stage.

Transforms come from ``timm.data.create_transform`` with the backbone's data config (mean, std,
interpolation, crop_pct). Train: random-resized-crop with scale (0.35, 1) (digits: (0.7, 1)),
optional horizontal flip, no colour jitter / auto-augment. Eval: resize to ``img_size / crop_pct``
then center crop. With ``cache=True`` every image is decoded and resized ONCE into uint8 tensors
``(N, 3, H, W)`` and the per-epoch augmentation runs on tensors (``torchvision.transforms.v2``).

Every problem with the data raises ``DataError`` with a one-line message; a bad option value
(``img_size``, ``val_fraction``, ``task`` for data that has no tasks) raises ``UsageError``.
Nothing here prints.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.utils.data
from PIL import Image

from . import defaults
from .checkpoint import write_json
from .errors import DataError, UsageError

__all__ = [
    "TaskData",
    "eval_transform",
    "open_image",
    "load_task_data",
    "default_num_workers",
    "make_loader",
    "IMG_EXTENSIONS",
    "GTSRB_CLASSES",
    "TORCHVISION_DATASETS",
]

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")

# Tasks whose class changes (or whose text becomes unreadable) under a horizontal flip.
NO_HFLIP_TASKS = frozenset({"digits", "gtsrb", "svhn", "omniglot", "mnist", "kmnist", "emnist", "usps"})

DEFAULT_TRAIN_SCALE = (0.35, 1.0)
DIGITS_TRAIN_SCALE = (0.7, 1.0)
TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)
DIGITS_IMG_SIZE = 32
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 20190601  # fixed: the digits test split never depends on the run's --seed

GTSRB_CLASSES = [
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
    "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)", "Speed limit (100km/h)",
    "Speed limit (120km/h)", "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution", "Dangerous curve to the left",
    "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road", "Road narrows on the right",
    "Road work", "Traffic signals", "Pedestrians", "Children crossing", "Bicycles crossing",
    "Beware of ice/snow", "Wild animals crossing", "End of all speed and passing limits", "Turn right ahead",
    "Turn left ahead", "Ahead only", "Go straight or right", "Go straight or left", "Keep right", "Keep left",
    "Roundabout mandatory", "End of no passing", "End of no passing by vehicles over 3.5 metric tons",
]

SPLIT_FORMAT = "nettailor-split/1"
_CACHE_PROBE = 16  # items decoded serially to decide whether threads pay off
_CACHE_THREAD_MIN_S = 0.0015


# --------------------------------------------------------------------------------------------
# Public result type
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Sample sources: something that can hand out PIL images and labels without a transform
# --------------------------------------------------------------------------------------------


class _Samples:
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

    def subset(self, idx: Sequence[int]) -> "_Samples":
        raise NotImplementedError


def open_image(path: Path) -> Image.Image:
    """An image file as RGB, exactly as training and validation read it (16-bit, palette, CMYK...).

    Raises PIL's errors (``UnidentifiedImageError``, ``OSError``) for unreadable files.
    """
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return _to_rgb(img)


def eval_transform(input_config: dict, *, normalize: bool = True) -> Callable:
    """The evaluation transform of a task: RGB PIL image -> ``(3, img_size, img_size)`` tensor.

    ``input_config`` holds ``img_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct`` and
    ``crop_mode`` (timm's ``center``/``squash``/``border``; ``center`` when absent), as a run's
    ``run.json`` "data" and an adapter's ``adapter_config.json`` "input" record them. Validation,
    test, ``nettailor predict``, ``load_export`` users and ``examples/serve.py`` all use this one
    function. ``normalize=False`` returns uint8 (the cache stores it and normalises later).
    """
    from timm.data import create_transform

    return create_transform(int(input_config["img_size"]), is_training=False,
                            interpolation=str(input_config["interpolation"]),
                            mean=tuple(input_config["mean"]), std=tuple(input_config["std"]),
                            crop_pct=float(input_config["crop_pct"]),
                            crop_mode=str(input_config.get("crop_mode") or "center"), normalize=normalize)


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


class _FileSamples(_Samples):
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

    def subset(self, idx: Sequence[int]) -> "_FileSamples":
        return _FileSamples(self.root, [self.rels[i] for i in idx], [self.labels[i] for i in idx])


class _ArraySamples(_Samples):
    """Items ``images[index[i]]`` of an in-memory uint8 array ``(N, H, W)`` or ``(N, H, W, 3)``."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], index: Sequence[int] | None = None):
        self.images = images
        self.labels = [int(x) for x in labels]
        self.index = list(range(len(images))) if index is None else list(index)

    def key(self, i: int) -> int:
        return self.index[i]

    def load(self, i: int) -> Image.Image:
        return _to_rgb(Image.fromarray(self.images[self.index[i]]))

    def subset(self, idx: Sequence[int]) -> "_ArraySamples":
        return _ArraySamples(self.images, [self.labels[i] for i in idx], [self.index[i] for i in idx])


class _DatasetSamples(_Samples):
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

    def subset(self, idx: Sequence[int]) -> "_DatasetSamples":
        return _DatasetSamples(self.base, [self.index[i] for i in idx], [self.labels[i] for i in idx], self.prefix)


# --------------------------------------------------------------------------------------------
# Datasets handed to the trainer
# --------------------------------------------------------------------------------------------


class Normalize:
    """uint8 ``(3, H, W)`` tensor -> float32 ``(3, H, W)``: ``(x / 255 - mean) / std``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) / 255.0 - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class ImageDataset(torch.utils.data.Dataset):
    """Decodes each item on access: ``prep(PIL RGB) -> uint8 (3, H, W)``, then ``post`` -> float32.

    Items: ``(float32 (3, img_size, img_size), int label)``. ``skip_bad``: the data was loaded with
    ``--skip-bad`` (so an unreadable item's message does not suggest passing it).
    """

    def __init__(self, samples: _Samples, prep: Callable, post: Callable, skip_bad: bool = False):
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
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(_bad_image_msg(self.samples.describe(i), e, self.skip_bad)) from None
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


class TensorTrainTransform:
    """Train augmentation on a uint8 ``(3, S, S)`` tensor -> float32 ``(3, img_size, img_size)``.

    Random-resized-crop (``scale``, ``ratio``, antialiased), optional horizontal flip, normalise.
    Uses torch's RNG (DataLoader seeds it per worker).
    """

    def __init__(self, img_size: int, scale: tuple[float, float], ratio: tuple[float, float],
                 interpolation: str, hflip: bool, mean: Sequence[float], std: Sequence[float]):
        from torchvision.transforms import v2

        self.img_size = img_size
        ops: list[Any] = [v2.RandomResizedCrop(img_size, scale=scale, ratio=ratio,
                                               interpolation=_tv_interp(interpolation), antialias=True)]
        if hflip:
            ops.append(v2.RandomHorizontalFlip(0.5))
        self.aug = v2.Compose(ops)
        self.normalize = Normalize(mean, std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.aug(x))


class TensorCenterCrop:
    """``--no-augment`` on the cache: centre crop to ``img_size`` and normalise (picklable for workers)."""

    def __init__(self, img_size: int, normalize: Normalize):
        self.img_size, self.normalize = img_size, normalize

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2.functional import center_crop

        return self.normalize(center_crop(x, [self.img_size, self.img_size]))


def _tv_interp(name: str):
    from torchvision.transforms import InterpolationMode

    return {
        "nearest": InterpolationMode.NEAREST,
        "bicubic": InterpolationMode.BICUBIC,
        "lanczos": InterpolationMode.BILINEAR,  # not supported on tensors
        "box": InterpolationMode.BILINEAR,
        "hamming": InterpolationMode.BILINEAR,
    }.get(name, InterpolationMode.BILINEAR)


# --------------------------------------------------------------------------------------------
# Transforms (timm factory)
# --------------------------------------------------------------------------------------------


@dataclass
class _Preproc:
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    crop_mode: str
    hflip: bool
    scale: tuple[float, float]
    augment: bool = True

    @property
    def scale_size(self) -> int:
        """Shorter side before the eval center crop (timm: ``floor(img_size / crop_pct)``)."""
        return max(self.img_size, math.floor(self.img_size / self.crop_pct))

    def eval_prep(self) -> Callable:
        """PIL RGB -> uint8 ``(3, img_size, img_size)``: timm eval transform without normalisation."""
        return eval_transform({"img_size": self.img_size, "mean": self.mean, "std": self.std,
                               "interpolation": self.interpolation, "crop_pct": self.crop_pct,
                               "crop_mode": self.crop_mode}, normalize=False)

    def train_prep(self) -> Callable:
        """PIL RGB -> uint8 ``(3, img_size, img_size)``: timm train transform without normalisation."""
        from timm.data import create_transform

        if not self.augment:  # --no-augment: train images as the evaluation sees them
            return self.eval_prep()

        return create_transform(self.img_size, is_training=True, scale=self.scale, ratio=TRAIN_RATIO,
                                hflip=0.5 if self.hflip else 0.0, vflip=0.0, color_jitter=None,
                                auto_augment=None, re_prob=0.0, interpolation=self.interpolation,
                                mean=self.mean, std=self.std, normalize=False)

    def cache_train_prep(self) -> Callable:
        """PIL RGB -> uint8 ``(3, S, S)``, ``S = scale_size``: what the train cache stores."""
        from timm.data import create_transform

        return create_transform(self.scale_size, is_training=False, interpolation=self.interpolation,
                                mean=self.mean, std=self.std, crop_pct=1.0, crop_mode="center",
                                normalize=False)

    def normalize(self) -> Normalize:
        return Normalize(self.mean, self.std)

    def tensor_train(self) -> Callable:
        if not self.augment:
            return TensorCenterCrop(self.img_size, self.normalize())
        return TensorTrainTransform(self.img_size, self.scale, TRAIN_RATIO, self.interpolation, self.hflip,
                                    self.mean, self.std)


# --------------------------------------------------------------------------------------------
# Raw task description produced by each layout reader
# --------------------------------------------------------------------------------------------


@dataclass
class _RawTask:
    name: str
    layout: str
    classes: list[str]
    train: _Samples
    val: _Samples | None  # None: we make the split from ``train``
    test: _Samples | None = None
    groups: list[str] | None = None  # per train item: split group (GTSRB track)
    preferred_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    scale: tuple[float, float] = DEFAULT_TRAIN_SCALE
    source: str = ""
    skipped: list[str] = field(default_factory=list)


def _bad_image_msg(name: str, err: BaseException, skip_bad: bool = False) -> str:
    """One-line message for an unreadable image; ``skip_bad``: --skip-bad was given (do not suggest it)."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    if skip_bad:
        return (f"cannot read image {name} ({reason}): it is truncated or not an image and was not skipped "
                f"(--skip-bad skips the image files that fail to decode before training); replace or delete it")
    return (f"cannot read image {name} ({reason}): it is truncated or not an image; "
            f"replace or delete it, or pass --skip-bad to skip unreadable images")


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".")


def _subdirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_in(folder: Path) -> list[Path]:
    """All image files below ``folder`` (recursive), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and _is_image(p))


def _check_header(path: Path) -> BaseException | None:
    """Cheap integrity check: PIL header parse + ``verify()`` (CRC for PNG). Returns the error."""
    try:
        with open(path, "rb") as f:
            with Image.open(f) as img:
                img.verify()
        return None
    except Exception as e:  # PIL raises a zoo of types for broken files
        return e


def _check_decode(samples: _FileSamples, i: int) -> BaseException | None:
    """Full check: decode item ``i`` exactly as the loader will (``samples.load``). Returns the error."""
    try:
        samples.load(i)
        return None
    except Exception as e:  # PIL raises a zoo of types for broken files
        return e.with_traceback(None)  # the traceback would keep the frames (and the image) alive


def _verify_files(samples: _FileSamples, skip_bad: bool, skipped: list[str]) -> _FileSamples:
    """Check every file up front; drop bad ones (``skip_bad``) or raise ``DataError``.

    Without ``skip_bad`` the check is cheap (header + ``verify()``; a truncated JPEG passes it and the
    loader raises ``DataError`` naming it). With ``skip_bad`` every image is decoded once, so that every
    file the loader could not read is skipped here, before the split and before training.
    """
    if len(samples) == 0:
        return samples
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as ex:
        if skip_bad:
            errors = list(ex.map(lambda i: _check_decode(samples, i), range(len(samples)), chunksize=16))
        else:
            errors = list(ex.map(_check_header, [samples.path(i) for i in range(len(samples))], chunksize=64))
    bad = [i for i, e in enumerate(errors) if e is not None]
    if not bad:
        return samples
    if not skip_bad:
        i = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(_bad_image_msg(samples.rels[i] + more, errors[i]))  # type: ignore[arg-type]
    skipped.extend(samples.rels[i] for i in bad)
    bad_set = set(bad)
    return samples.subset([i for i in range(len(samples)) if i not in bad_set])


def _check_classes_present(samples: _Samples, classes: list[str], where: str) -> None:
    counts = np.bincount(np.asarray(samples.labels, dtype=np.int64), minlength=len(classes))
    empty = [classes[i] for i in range(len(classes)) if counts[i] == 0]
    if empty:
        raise DataError(f"class {empty[0]!r} has no readable images in {where}"
                        f"{f' (also {empty[1:]})' if len(empty) > 1 else ''}; "
                        f"add images or remove the class folder")


# --------------------------------------------------------------------------------------------
# Layout readers
# --------------------------------------------------------------------------------------------


def _read_digits() -> _RawTask:
    ref = resources.files("tailor_cli") / "assets" / "digits.npz"
    with ref.open("rb") as f:
        npz = np.load(io.BytesIO(f.read()))
        images, labels = np.asarray(npz["images"], dtype=np.uint8), np.asarray(npz["labels"], dtype=np.int64)
    # A fixed held-out test split (the same for every --seed and --val-fraction), reported only:
    # 20% of each class, 359 of the 1,797 images. Validation is carved from the other 1,438.
    samples = _ArraySamples(images, labels.tolist())
    rest, test = make_split(samples.labels, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    return _RawTask(name="digits", layout="digits", classes=[str(i) for i in range(10)],
                    train=samples.subset(rest), val=None, test=samples.subset(test),
                    preferred_size=DIGITS_IMG_SIZE, crop_pct=1.0, interpolation="bilinear",
                    scale=DIGITS_TRAIN_SCALE, source="embedded")


def _class_folders(folder: Path, where: str) -> tuple[list[str], list[list[Path]]]:
    """Class folders directly under ``folder`` and their images. Raises on empty/unusable trees."""
    dirs = _subdirs(folder)
    if not dirs:
        if any(_is_image(p) for p in folder.iterdir() if p.is_file()):
            raise DataError(f"{where} has images but no class folders; put each class's images in "
                            f"its own subfolder ({where}/<class>/...)")
        raise DataError(f"{where} is empty; it needs one subfolder of images per class")
    files = [_images_in(d) for d in dirs]
    for d, fs in zip(dirs, files):
        if not fs:
            raise DataError(f"class folder {where}/{d.name} has no images ({', '.join(IMG_EXTENSIONS[:4])}...); "
                            f"add images or remove the folder")
    return [d.name for d in dirs], files


def _folder_samples(root: Path, files: list[list[Path]]) -> _FileSamples:
    rels, labels = [], []
    for k, fs in enumerate(files):
        for p in fs:
            rels.append(p.relative_to(root).as_posix())
            labels.append(k)
    return _FileSamples(root, rels, labels)


def _read_imagefolder(path: Path) -> _RawTask:
    """``train/`` + (``val/`` | ``valid/`` | ``test/``)[+ ``test/``], or flat class folders."""
    name = path.name
    train_dir = path / "train"
    if train_dir.is_dir():
        classes, files = _class_folders(train_dir, f"{path.name}/train")
        train = _folder_samples(path, files)
        val_dir = next((path / n for n in ("val", "valid", "validation") if (path / n).is_dir()), None)
        test_dir = path / "test" if (path / "test").is_dir() else None  # reported only; with no val/,
        # the validation split is carved from train/ (choices never read test/)
        val = _split_folder(path, val_dir, classes) if val_dir is not None else None
        test = _split_folder(path, test_dir, classes) if test_dir is not None else None
        return _RawTask(name=name, layout="imagefolder", classes=classes, train=train, val=val, test=test,
                        source=str(path))
    classes, files = _class_folders(path, path.name)
    return _RawTask(name=name, layout="imagefolder-flat", classes=classes,
                    train=_folder_samples(path, files), val=None, source=str(path))


def _split_folder(root: Path, folder: Path, classes: list[str]) -> _FileSamples:
    where = f"{root.name}/{folder.name}"
    names, files = _class_folders(folder, where)
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise DataError(f"{where} has class folders not in train/: {unknown}; "
                        f"rename or remove them so both splits have the same classes")
    index = {c: i for i, c in enumerate(classes)}
    rels, labels = [], []
    for n, fs in zip(names, files):
        for p in fs:
            rels.append(p.relative_to(root).as_posix())
            labels.append(index[n])
    return _FileSamples(root, rels, labels)


def _find_gtsrb(path: Path) -> Path | None:
    """The folder holding ``GTSRB/`` (accepts it, ``GTSRB/``, ``GTSRB/Training`` or torchvision's root)."""
    if path.name == "GTSRB" and (path / "Training").is_dir():
        return path.parent
    if path.name == "Training" and path.parent.name == "GTSRB":
        return path.parent.parent
    for cand in (path, path / "gtsrb"):
        if (cand / "GTSRB" / "Training").is_dir():
            return cand
    return None


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter=";", skipinitialspace=True))


def _read_gtsrb(base: Path, skip_bad: bool, skipped: list[str]) -> _RawTask:
    training = base / "GTSRB" / "Training"
    dirs = [d for d in _subdirs(training) if d.name.isdigit()]
    if not dirs:
        raise DataError(f"{training} has no class folders (00000, 00001, ...); re-extract GTSRB-Training")
    ids = [int(d.name) for d in dirs]
    classes = ([GTSRB_CLASSES[i] for i in ids] if ids == list(range(len(GTSRB_CLASSES)))
               else [d.name for d in dirs])
    rels, labels, groups = [], [], []
    for k, d in enumerate(dirs):
        csv_path = d / f"GT-{d.name}.csv"
        if not csv_path.is_file():
            raise DataError(f"GTSRB class folder {d.relative_to(base)} is missing its CSV {csv_path.name}; "
                            f"re-extract GTSRB-Training_fixed.zip there")
        rows = _read_csv(csv_path)
        if not rows or "Filename" not in rows[0]:
            raise DataError(f"{csv_path.relative_to(base)} has no 'Filename' column or no rows; re-extract it")
        for row in rows:
            fn = row["Filename"].strip()
            rel = (d / fn).relative_to(base).as_posix()
            if not (d / fn).is_file():
                if skip_bad:
                    skipped.append(rel)
                    continue
                raise DataError(f"{rel} is listed in {csv_path.name} but does not exist; "
                                f"restore it or pass --skip-bad")
            rels.append(rel)
            labels.append(k)
            groups.append(f"{d.name}/{fn.split('_')[0]}")
    train = _FileSamples(base, rels, labels)
    test = _read_gtsrb_test(base, dirs, skip_bad, skipped)
    return _RawTask(name="gtsrb", layout="gtsrb", classes=classes, train=train, val=None, test=test,
                    groups=groups, source=str(base))


def _read_gtsrb_test(base: Path, dirs: list[Path], skip_bad: bool, skipped: list[str]) -> _FileSamples | None:
    images = base / "GTSRB" / "Final_Test" / "Images"
    if not images.is_dir():
        return None
    csv_path = next((p for p in (images / "GT-final_test.csv", base / "GT-final_test.csv",
                                 base / "GTSRB" / "GT-final_test.csv") if p.is_file()), None)
    if csv_path is None:
        return None  # only the unlabelled GT-final_test.test.csv: no test accuracy possible
    index = {int(d.name): k for k, d in enumerate(dirs)}
    rels, labels = [], []
    for row in _read_csv(csv_path):
        if "ClassId" not in row or "Filename" not in row:
            return None
        cid = int(row["ClassId"])
        if cid not in index:
            raise DataError(f"{csv_path.name} uses ClassId {cid} which has no training folder; "
                            f"use the full GTSRB training set")
        rel = (images / row["Filename"].strip()).relative_to(base).as_posix()
        if not (base / rel).is_file():
            if skip_bad:
                skipped.append(rel)
                continue
            raise DataError(f"{rel} is listed in {csv_path.name} but does not exist; restore it or pass --skip-bad")
        rels.append(rel)
        labels.append(index[cid])
    return _FileSamples(base, rels, labels)


def _load_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}); re-extract the annotations") from None


def _decathlon_tasks(root: Path) -> list[str]:
    return sorted(p.name[: -len("_train.json")] for p in (root / "annotations").glob("*_train.json"))


def _decathlon_split(root: Path, doc: dict, first_id: int, n_classes: int, where: str,
                     skip_bad: bool, skipped: list[str]) -> _FileSamples:
    label_of = {a["image_id"]: a["category_id"] for a in doc.get("annotations", [])}
    root_r = root.resolve()
    rels, labels = [], []
    for im in doc.get("images", []):
        fn = str(im["file_name"])
        full = (root / fn).resolve()
        if not full.is_relative_to(root_r):
            raise DataError(f"{where} lists file {fn!r} outside the dataset root {root}; "
                            f"fix the annotation file (file names must be relative to the root)")
        if im["id"] not in label_of:
            raise DataError(f"{where}: image {fn!r} has no annotation; use the *_train/*_val.json files")
        label = int(label_of[im["id"]]) - first_id
        if not 0 <= label < n_classes:
            raise DataError(f"{where}: image {fn!r} has category_id {label_of[im['id']]} outside the task's "
                            f"categories; fix the annotation file")
        rel = full.relative_to(root_r).as_posix()
        if not full.is_file():
            if skip_bad:
                skipped.append(rel)
                continue
            raise DataError(f"{rel} is listed in {where} but does not exist; restore it or pass --skip-bad")
        rels.append(rel)
        labels.append(label)
    return _FileSamples(root_r, rels, labels)


def _read_decathlon(root: Path, task: str | None, skip_bad: bool, skipped: list[str]) -> _RawTask:
    tasks = _decathlon_tasks(root)
    if not tasks:
        raise DataError(f"{root}/annotations has no <task>_train.json files; is this a Visual Decathlon folder?")
    if task is None or task not in tasks:
        what = "needs --task" if task is None else f"has no task {task!r}"
        raise DataError(f"Visual Decathlon data {what}; available tasks: {', '.join(tasks)}")
    ann = root / "annotations"
    train_doc = _load_json(ann / f"{task}_train.json")
    cats = sorted(train_doc.get("categories", []), key=lambda c: c["id"])
    if len(cats) < 2:
        raise DataError(f"{task}_train.json has {len(cats)} categories; a task needs at least 2")
    first_id = int(cats[0]["id"])
    if [int(c["id"]) for c in cats] != list(range(first_id, first_id + len(cats))):
        raise DataError(f"{task}_train.json category ids are not contiguous; fix the annotation file")
    classes = [str(c.get("name", c["id"])) for c in cats]
    train = _decathlon_split(root, train_doc, first_id, len(classes), f"{task}_train.json", skip_bad, skipped)
    val = None
    if (ann / f"{task}_val.json").is_file():
        val = _decathlon_split(root, _load_json(ann / f"{task}_val.json"), first_id, len(classes),
                               f"{task}_val.json", skip_bad, skipped)
    # *_test_stripped.json has no labels: no test split.
    return _RawTask(name=task, layout="decathlon", classes=classes, train=train, val=val,
                    source=str(root.resolve()))


# ---- torchvision ---------------------------------------------------------------------------

# name -> (class name, train kwargs, val kwargs | None, test kwargs | None)
TORCHVISION_DATASETS: dict[str, tuple[str, dict, dict | None, dict | None]] = {
    "cifar10": ("CIFAR10", {"train": True}, None, {"train": False}),
    "cifar100": ("CIFAR100", {"train": True}, None, {"train": False}),
    "svhn": ("SVHN", {"split": "train"}, None, {"split": "test"}),
    "gtsrb": ("GTSRB", {"split": "train"}, None, {"split": "test"}),
    "flowers102": ("Flowers102", {"split": "train"}, {"split": "val"}, {"split": "test"}),
    "dtd": ("DTD", {"split": "train"}, {"split": "val"}, {"split": "test"}),
    "fgvcaircraft": ("FGVCAircraft", {"split": "train"}, {"split": "val"}, {"split": "test"}),
    "oxfordiiitpet": ("OxfordIIITPet", {"split": "trainval"}, None, {"split": "test"}),
    "food101": ("Food101", {"split": "train"}, None, {"split": "test"}),
    "stl10": ("STL10", {"split": "train"}, None, {"split": "test"}),
    "mnist": ("MNIST", {"train": True}, None, {"train": False}),
    "fashionmnist": ("FashionMNIST", {"train": True}, None, {"train": False}),
    "kmnist": ("KMNIST", {"train": True}, None, {"train": False}),
}


def _tv_targets(ds: Any) -> list[int]:
    """Labels of a torchvision dataset without decoding images when possible."""
    for attr in ("targets", "labels", "_labels"):
        val = getattr(ds, attr, None)
        if val is not None:
            return [int(x) for x in (val.tolist() if hasattr(val, "tolist") else val)]
    samples = getattr(ds, "_samples", None) or getattr(ds, "samples", None)
    if samples is not None:
        return [int(s[1]) for s in samples]
    return [int(ds[i][1]) for i in range(len(ds))]


def _tv_open(cls: Callable, root: Path, kwargs: dict, download: bool, name: str) -> Any:
    try:
        return cls(root=str(root), download=download, **kwargs)
    except RuntimeError as e:
        if download:
            raise DataError(f"torchvision:{name} could not be prepared under {root} ({str(e).splitlines()[0]}); "
                            f"delete the folder and retry with --download") from None
        raise DataError(f"torchvision:{name} is not downloaded under {root}; pass --download to fetch it "
                        f"(or set NETTAILOR_DATA_ROOT to the folder holding an existing copy)") from None
    except (OSError, ValueError) as e:  # URLError is an OSError
        if not download:
            raise DataError(f"torchvision:{name} under {root} is missing or unreadable ({str(e).splitlines()[0]}); "
                            f"pass --download to fetch it") from None
        raise DataError(f"downloading torchvision:{name} into {root} failed ({str(e).splitlines()[0]}); "
                        f"check the internet connection or place the files there by hand") from None
    except ImportError as e:
        raise DataError(f"torchvision:{name} needs an extra package to read its files ({e}); install it") from None


def _read_torchvision(spec: str, download: bool, root: Path | None) -> _RawTask:
    import torchvision.datasets as tvd

    name = spec.split(":", 1)[1].strip()
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TORCHVISION_DATASETS:
        raise DataError(f"unsupported dataset torchvision:{name}; supported: "
                        f"{', '.join(v[0] for v in TORCHVISION_DATASETS.values())}")
    cls_name, train_kw, val_kw, test_kw = TORCHVISION_DATASETS[key]
    default = os.environ.get("NETTAILOR_DATA_ROOT", "~/.cache/nettailor/datasets")
    base_root = Path(root) if root is not None else Path(default).expanduser()
    ds_root = base_root / "svhn" if key == "svhn" else base_root  # others make their own subfolder
    cls = getattr(tvd, cls_name)
    tr = _tv_open(cls, ds_root, train_kw, download, cls_name)
    tr_labels = _tv_targets(tr)
    n_classes = max(tr_labels) + 1
    classes = list(getattr(tr, "classes", None) or [])
    if len(classes) != n_classes:
        classes = GTSRB_CLASSES[:] if key == "gtsrb" and n_classes == 43 else [str(i) for i in range(n_classes)]
    classes = [str(c) for c in classes]
    groups = None
    if key == "gtsrb":  # split by track: file name prefix before '_'
        groups = [f"{lab}/{Path(p).name.split('_')[0]}" for p, lab in tr._samples]

    def samples(ds: Any, prefix: str) -> _DatasetSamples:
        return _DatasetSamples(ds, range(len(ds)), _tv_targets(ds), prefix)

    val = samples(_tv_open(cls, ds_root, val_kw, download, cls_name), f"{key}-val") if val_kw else None
    test = samples(_tv_open(cls, ds_root, test_kw, download, cls_name), f"{key}-test") if test_kw else None
    return _RawTask(name=key, layout="torchvision", classes=classes, train=_DatasetSamples(tr, range(len(tr)),
                    tr_labels, f"{key}-train"), val=val, test=test, groups=groups,
                    source=f"torchvision:{cls_name}")


def _read_task(data: str, task: str | None, download: bool, root_for_download: Path | None,
               skip_bad: bool, skipped: list[str]) -> _RawTask:
    """Detect the layout of ``data`` and read its file lists (no image decoding)."""
    if data == "digits" and not Path(data).is_dir():
        _check_no_task(task, data, "the embedded digits")
        return _read_digits()
    if data.startswith("torchvision:"):
        _check_no_task(task, data, "a torchvision dataset")
        return _read_torchvision(data, download, root_for_download)
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"data path {data} does not exist; pass an image folder, 'digits', or torchvision:NAME")
    if not path.is_dir():
        raise DataError(f"data path {data} is a file, not a folder; pass the folder that holds the class folders")
    path = path.resolve()
    if (path / "annotations").is_dir() and (path / "data").is_dir():
        return _read_decathlon(path, task, skip_bad, skipped)
    gtsrb = _find_gtsrb(path)
    if gtsrb is not None:
        _check_no_task(task, data, "GTSRB data")
        return _read_gtsrb(gtsrb, skip_bad, skipped)
    _check_no_task(task, data, "an image folder")
    return _read_imagefolder(path)


def _check_no_task(task: str | None, data: str, kind: str) -> None:
    """``task`` only selects a Visual Decathlon task; anywhere else it would be silently ignored."""
    if task is not None:
        raise UsageError(f"--task applies only to Visual Decathlon data (a folder with annotations/ and data/); "
                         f"{data} is {kind}; drop --task {task}")


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def make_split(labels: Sequence[int], val_fraction: float, seed: int,
               groups: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """Stratified, seeded train/val split of item indices.

    Per class, whole groups (e.g. GTSRB tracks; each item its own group when ``groups`` is None)
    are shuffled and ``round(val_fraction * n_groups)`` go to val, clamped to ``[1, n_groups - 1]``
    when a class has at least 2 groups (a class with one group stays in train).

    Returns:
        ``(train_idx, val_idx)``, each sorted.
    """
    _check_val_fraction(val_fraction)
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    keys = list(groups) if groups is not None else [str(i) for i in range(len(labels))]
    train_idx: list[int] = []
    val_idx: list[int] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        by_group: dict[str, list[int]] = {}
        for i in members:
            by_group.setdefault(keys[i], []).append(int(i))
        names = sorted(by_group)
        n_val = int(round(val_fraction * len(names)))
        n_val = min(max(n_val, 1), len(names) - 1) if len(names) >= 2 else 0
        order = rng.permutation(len(names))
        for j, g in enumerate(order):
            (val_idx if j < n_val else train_idx).extend(by_group[names[g]])
    return sorted(train_idx), sorted(val_idx)


def _read_split_file(split_file: Path, raw: _RawTask, skipped: list[str]) -> tuple[list[int], list[int]]:
    """Indices into ``raw.train`` of the stored split; stored items that were skipped are dropped."""
    try:
        doc = json.loads(split_file.read_text())
        stored_train, stored_val = list(doc["train"]), list(doc["val"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"split file {split_file} is corrupt ({type(e).__name__}); "
                        f"delete it to make a new split (the run will then use a different split)") from None
    if doc.get("layout") not in (None, raw.layout):
        raise DataError(f"split file {split_file} was made for {doc.get('layout')} data, not {raw.layout}; "
                        f"pass the original --data or delete the split file")
    index = {raw.train.key(i): i for i in range(len(raw.train))}
    gone = set(skipped)
    missing = [k for k in stored_train + stored_val if k not in index and k not in gone]
    if missing:
        raise DataError(f"split file {split_file} lists {len(missing)} item(s) missing from the data "
                        f"(e.g. {missing[0]}); pass the same --data as the first stage or delete the split file")
    return ([index[k] for k in stored_train if k in index], [index[k] for k in stored_val if k in index])


def _split(raw: _RawTask, split_file: Path | None, val_fraction: float, seed: int,
           skipped: list[str]) -> tuple[_Samples, _Samples, str]:
    """Make (or load) the train/val split of ``raw.train``. Returns ``(train, val, how)``."""
    if split_file is not None and Path(split_file).is_file():
        tr, va = _read_split_file(Path(split_file), raw, skipped)
        how = "loaded"
    else:
        tr, va = make_split(raw.train.labels, val_fraction, seed, raw.groups)
        how = "made"
        if split_file is not None:
            write_json(Path(split_file), {
                "format": SPLIT_FORMAT, "layout": raw.layout, "name": raw.name, "seed": seed,
                "val_fraction": val_fraction, "classes": raw.classes,
                "train": [raw.train.key(i) for i in tr], "val": [raw.train.key(i) for i in va],
            })
            how = "created"
    if not va:
        raise DataError(f"{raw.name}: too few images to make a validation split "
                        f"(each class needs at least 2 images{' in 2 tracks' if raw.groups else ''}); add images")
    return raw.train.subset(tr), raw.train.subset(va), how


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def build_cache(samples: _Samples, prep: Callable, *, skip_bad: bool = False,
                skipped: list[str] | None = None, threads: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[str | int]]:
    """Decode every item once: ``prep(PIL) -> uint8 (3, H, W)``.

    Decoding uses ``threads`` threads; by default 1 for small images (Python overhead dominates and
    threads fight over the GIL) and up to 4 when the first items take > 1.5 ms each to decode.
    Items are written into one preallocated tensor as they are decoded, so the peak is the cache
    itself (not the cache plus a list of every image).

    Returns:
        ``images`` uint8 ``(N, 3, H, W)``, ``targets`` int64 ``(N,)``, keys of the kept items.
        Unreadable items raise ``DataError`` or, with ``skip_bad``, are left out and listed in ``skipped``.
    """
    def one(i: int) -> torch.Tensor | BaseException:
        try:
            return prep(samples.load(i))
        except (OSError, SyntaxError, ValueError) as e:
            return e

    n = len(samples)
    images: torch.Tensor | None = None
    bad: dict[int, BaseException] = {}

    def store(i: int, item: torch.Tensor | BaseException) -> None:
        nonlocal images
        if not isinstance(item, torch.Tensor):
            if not skip_bad:
                raise DataError(_bad_image_msg(samples.describe(i), item))
            bad[i] = item
            return
        if images is None:
            images = torch.empty((n, *item.shape), dtype=torch.uint8)
        images[i] = item

    t0 = time.perf_counter()
    probe = min(n, _CACHE_PROBE)
    for i in range(probe):
        store(i, one(i))
    per_item = (time.perf_counter() - t0) / max(1, probe)
    if threads is None:  # threads only pay off when decoding dominates (large files); small ones hit the GIL
        threads = max(1, min(4, os.cpu_count() or 1)) if per_item > _CACHE_THREAD_MIN_S else 1
    rest = range(probe, n)
    if threads > 1 and len(rest) > 64:
        with ThreadPoolExecutor(threads) as ex:
            for i, item in zip(rest, ex.map(one, rest, chunksize=16)):
                store(i, item)
    else:
        for i in rest:
            store(i, one(i))
    keep = [i for i in range(n) if i not in bad]
    if bad and skipped is not None:
        skipped.extend(samples.describe(i) for i in sorted(bad))
    if images is None:
        images = torch.empty((0, 3, 1, 1), dtype=torch.uint8)
    elif bad:
        images = images[torch.tensor(keep, dtype=torch.long)]
    targets = torch.tensor([samples.labels[i] for i in keep], dtype=torch.int64)
    return images, targets, [samples.key(i) for i in keep]


def available_memory_bytes() -> int | None:
    """Memory the system can give this process without swapping (Linux ``MemAvailable``), if known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_cache_fits(items: list[tuple[int, int]], *, available: int | None = None, fraction: float = 0.8) -> int:
    """Refuse a cache larger than ``fraction`` of the available memory; return its size in bytes.

    ``items``: ``(count, side)`` per cached split, each image stored as uint8 ``(3, side, side)``.
    """
    need = sum(3 * count * side * side for count, side in items)
    available = available_memory_bytes() if available is None else available
    if available is not None and need > fraction * available:
        gib = 2**30
        raise DataError(
            f"--cache needs about {need / gib:.1f} GiB ({sum(c for c, _ in items)} images) but only "
            f"{available / gib:.1f} GiB of memory is available; drop --cache (images are then decoded "
            "on the fly by the loader workers) or lower --img-size"
        )
    return need


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


MIN_IMG_SIZE = 8


def _check_img_size(img_size: int | None) -> None:
    """An explicit ``img_size`` (``--img-size``) must be at least 8; 0 is not "default"."""
    if img_size is not None and int(img_size) < MIN_IMG_SIZE:
        raise UsageError(f"image size {int(img_size)} is too small; pass --img-size 32 or more")


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:  # also refuses NaN
        raise UsageError(f"--val-fraction must be between 0 and 1, both excluded (got {val_fraction}); "
                         f"pass e.g. 0.1")


def _resolve_img_size(img_size: int | None, preferred: int | None, data_config: dict) -> int:
    if img_size is not None:
        _check_img_size(img_size)
        size = int(img_size)
    elif preferred is not None:
        size = preferred
    else:
        size = int(data_config.get("input_size", (3, 224, 224))[-1])
    if size < MIN_IMG_SIZE:  # from the dataset or the backbone's data config
        raise DataError(f"image size {size} is too small; pass --img-size 32 or more")
    return size


def _check_expected(classes: list[str], expected: list[str] | None) -> None:
    if expected is None or list(expected) == classes:
        return
    expected = list(expected)
    if len(expected) != len(classes):
        extra = [c for c in classes if c not in expected]
        missing = [c for c in expected if c not in classes]
        raise DataError(f"data has {len(classes)} classes but the run was trained on {len(expected)}: "
                        f"new {extra[:5]}, missing {missing[:5]}; pass the data the run was started with")
    if set(expected) == set(classes):
        raise DataError(f"data has the run's {len(classes)} classes in a different order "
                        f"({classes[:3]}... vs {expected[:3]}...); pass the data the run was started with")
    extra = [c for c in classes if c not in expected]
    missing = [c for c in expected if c not in classes]
    raise DataError(f"data classes differ from the run's: new {extra[:5]}, missing {missing[:5]}; "
                    f"pass the data the run was started with")


def _interp_name(name: Any) -> str:
    """timm interpolation name usable by both PIL and tensor resizes ('random'/unknown -> bilinear)."""
    name = str(name or "bilinear").lower()
    return name if name in ("nearest", "bilinear", "bicubic") else "bilinear"


def _default_hflip(raw: _RawTask) -> bool:
    if raw.layout in ("digits", "gtsrb"):
        return False
    return raw.name.lower() not in NO_HFLIP_TASKS


def load_task_data(data: str, *, data_config: dict, img_size: int | None = None,
                   split_file: Path | None = None, task: str | None = None,
                   val_fraction: float = defaults.VAL_FRACTION, seed: int = 0, download: bool = False,
                   cache: bool = False, hflip: bool | None = None, skip_bad: bool = False,
                   expected_classes: list[str] | None = None, root_for_download: Path | None = None,
                   train_scale: tuple[float, float] | None = None, verify: bool = True,
                   augment: bool = True) -> TaskData:
    """Find, check and split a task's data; build its train/val(/test) datasets.

    Args:
        data: ``"digits"``, a folder (ImageFolder, flat ImageFolder, GTSRB, Visual Decathlon) or
            ``"torchvision:NAME"``.
        data_config: timm's resolved data config of the backbone (mean, std, interpolation,
            crop_pct, crop_mode, input_size).
        img_size: output size; precedence ``img_size`` > dataset preference (digits: 32) >
            ``data_config['input_size']``. An explicit ``img_size`` below 8 (0 included) is a ``UsageError``.
        split_file: JSON file of the validation split we make (flat / train-only / GTSRB / digits /
            torchvision sets without val). Read when it exists, else created atomically.
        task: Visual Decathlon task name; ``UsageError`` for any other layout (it would be ignored).
        val_fraction: fraction of each class (of each class's tracks for GTSRB) used for val;
            ``0 < val_fraction < 1`` (else ``UsageError``), checked even when the data has a val split.
        seed: split seed.
        download: allow torchvision to download ``torchvision:NAME`` into ``root_for_download``
            (default ``$NETTAILOR_DATA_ROOT``, else ``~/.cache/nettailor/datasets``).
        cache: decode + resize every image once into uint8 tensors; augment on tensors.
        hflip: random horizontal flips in training; None: off for digits/GTSRB/SVHN/Omniglot-like
            tasks, on otherwise.
        skip_bad: skip unreadable/missing images (listed in ``TaskData.skipped``) instead of failing.
            To find them, every image file is decoded once up front (threaded; slower than the header
            check ``verify`` does alone, and with ``cache`` the images are decoded a second time to fill
            the cache), so training never meets an unreadable file.
        expected_classes: class names (in order) the run was started with; mismatch -> DataError.
        train_scale: random-resized-crop area range (default (0.35, 1); digits (0.7, 1)).
        verify: check every image file up front: its header (PIL ``verify``, CRC for PNG), or with
            ``skip_bad`` a full decode. ``False``: no up-front check (bad files fail in the loader).

    Returns:
        ``TaskData``; items of each split are ``(float32 (3, S, S), int)`` with ``S = img_size``.
    """
    _check_img_size(img_size)  # option values first: before any (slow) reading of the data
    _check_val_fraction(val_fraction)
    skipped: list[str] = []
    raw = _read_task(str(data), task, download, root_for_download, skip_bad, skipped)
    if len(raw.classes) < 2:
        raise DataError(f"{raw.name} has only {len(raw.classes)} class ({raw.classes}); "
                        f"a classification task needs at least 2 class folders")
    _check_expected(raw.classes, expected_classes)

    if verify:
        for attr in ("train", "val", "test"):
            s = getattr(raw, attr)
            if isinstance(s, _FileSamples):
                setattr(raw, attr, _verify_files(s, skip_bad, skipped))
    _check_classes_present(raw.train, raw.classes, f"{raw.name} (train)")

    if raw.val is None:
        train_s, val_s, how = _split(raw, split_file, val_fraction, seed, skipped)
    else:
        train_s, val_s, how = raw.train, raw.val, "given"
        if len(val_s) == 0:
            raise DataError(f"{raw.name}: the validation split is empty; add images to it")

    pre = _Preproc(
        img_size=_resolve_img_size(img_size, raw.preferred_size, data_config),
        mean=tuple(float(x) for x in data_config.get("mean", (0.485, 0.456, 0.406))),  # type: ignore[arg-type]
        std=tuple(float(x) for x in data_config.get("std", (0.229, 0.224, 0.225))),  # type: ignore[arg-type]
        interpolation=_interp_name(raw.interpolation or data_config.get("interpolation")),
        crop_pct=float(raw.crop_pct if raw.crop_pct is not None else data_config.get("crop_pct", 0.875) or 0.875),
        crop_mode=str(data_config.get("crop_mode", "center") or "center"),
        hflip=_default_hflip(raw) if hflip is None else bool(hflip),
        scale=tuple(train_scale) if train_scale is not None else raw.scale,  # type: ignore[arg-type]
        augment=augment,
    )
    use_cache = cache or raw.layout == "digits"
    if use_cache:
        train_ds, val_ds, test_ds = _cached_splits(pre, train_s, val_s, raw.test, skip_bad, skipped)
    else:
        train_ds = ImageDataset(train_s, pre.train_prep(), pre.normalize(), skip_bad)
        val_ds = ImageDataset(val_s, pre.eval_prep(), pre.normalize(), skip_bad)
        test_ds = (ImageDataset(raw.test, pre.eval_prep(), pre.normalize(), skip_bad)
                   if raw.test is not None else None)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise DataError(f"{raw.name}: no readable images left in the {'train' if not len(train_ds) else 'val'} "
                        f"split after skipping {len(skipped)} bad file(s); fix the data")

    return TaskData(name=raw.name, layout=raw.layout, classes=raw.classes, train=train_ds, val=val_ds,
                    test=test_ds, img_size=pre.img_size, mean=pre.mean, std=pre.std,
                    interpolation=pre.interpolation, crop_pct=pre.crop_pct, hflip=pre.hflip, crop_mode=pre.crop_mode,
                    skipped=skipped, cached=use_cache, split=how, source=raw.source)


def _cached_splits(pre: _Preproc, train_s: _Samples, val_s: _Samples, test_s: _Samples | None,
                   skip_bad: bool, skipped: list[str]
                   ) -> tuple[CachedImageDataset, CachedImageDataset, CachedImageDataset | None]:
    """Train cached at ``scale_size`` (random crop later); val/test cached as the exact eval output."""
    norm = pre.normalize()
    check_cache_fits([(len(train_s), pre.scale_size), (len(val_s), pre.img_size),
                      (len(test_s) if test_s is not None else 0, pre.img_size)])
    imgs, tg, keys = build_cache(train_s, pre.cache_train_prep(), skip_bad=skip_bad, skipped=skipped)
    train_ds = CachedImageDataset(imgs, tg, pre.tensor_train(), keys)
    eval_prep = pre.eval_prep()
    imgs, tg, keys = build_cache(val_s, eval_prep, skip_bad=skip_bad, skipped=skipped)
    val_ds = CachedImageDataset(imgs, tg, norm, keys)
    test_ds = None
    if test_s is not None:
        imgs, tg, keys = build_cache(test_s, eval_prep, skip_bad=skip_bad, skipped=skipped)
        test_ds = CachedImageDataset(imgs, tg, norm, keys)
    return train_ds, val_ds, test_ds


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
