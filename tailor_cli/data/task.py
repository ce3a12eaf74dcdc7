"""``load_task_data``: find, check and split a task's data and build its datasets."""
from __future__ import annotations

from pathlib import Path

import torch.utils.data

from .. import defaults
from ..errors import DataError
from .cache import cached_splits
from .checks import (
    MIN_IMG_SIZE,
    check_classes_present,
    check_expected,
    check_img_size,
    check_split_seed,
    check_val_fraction,
    verify_files,
)
from .datasets import ImageDataset, TaskData
from .layouts import read_task
from .raw import RawTask
from .samples import FileSamples
from .split import split_train
from .transforms import Preproc, interp_name

# Tasks whose class changes (or whose text becomes unreadable) under a horizontal flip.
# Data whose class a mirror image can change: no flips by default when the data's name (a
# torchvision set, or the folder's name) contains one of these ("noisy-digits", "mnist5k", "KMNIST").
NO_HFLIP_WORDS = ("digit", "mnist", "svhn", "usps", "gtsrb", "traffic", "omniglot", "character", "letter")


def _resolve_img_size(img_size: int | None, preferred: int | None, data_config: dict) -> int:
    if img_size is not None:
        check_img_size(img_size)
        size = int(img_size)
    elif preferred is not None:
        size = preferred
    else:
        size = int(data_config.get("input_size", (3, 224, 224))[-1])
    if size < MIN_IMG_SIZE:  # from the dataset or the backbone's data config
        raise DataError(f"image size {size} is too small; pass --img-size 32 or more")
    return size


def _default_hflip(raw: RawTask) -> bool:
    if raw.layout in ("digits", "gtsrb"):
        return False
    name = raw.name.lower()
    return not any(word in name for word in NO_HFLIP_WORDS)


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
        seed: split seed (``--split-seed``; the stages pass the run's, never the training ``--seed``).
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
    check_img_size(img_size)  # option values first: before any (slow) reading of the data
    check_val_fraction(val_fraction)
    check_split_seed(seed)
    skipped: list[str] = []
    raw = read_task(str(data), task, download, root_for_download, skip_bad, skipped)
    if len(raw.classes) < 2:
        raise DataError(f"{raw.name} has only {len(raw.classes)} class ({raw.classes}); "
                        f"a classification task needs at least 2 class folders")
    check_expected(raw.classes, expected_classes)

    if verify:
        for attr in ("train", "val", "test"):
            s = getattr(raw, attr)
            if isinstance(s, FileSamples):
                setattr(raw, attr, verify_files(s, skip_bad, skipped))
    check_classes_present(raw.train, raw.classes, f"{raw.name} (train)")

    if raw.val is None:
        train_s, val_s, how = split_train(raw, split_file, val_fraction, seed, skipped)
    else:
        train_s, val_s, how = raw.train, raw.val, "given"
        if len(val_s) == 0:
            raise DataError(f"{raw.name}: the validation split is empty; add images to it")

    pre = Preproc(
        img_size=_resolve_img_size(img_size, raw.preferred_size, data_config),
        mean=tuple(float(x) for x in data_config.get("mean", (0.485, 0.456, 0.406))),  # type: ignore[arg-type]
        std=tuple(float(x) for x in data_config.get("std", (0.229, 0.224, 0.225))),  # type: ignore[arg-type]
        interpolation=interp_name(raw.interpolation or data_config.get("interpolation")),
        crop_pct=float(raw.crop_pct if raw.crop_pct is not None else data_config.get("crop_pct", 0.875) or 0.875),
        crop_mode=str(data_config.get("crop_mode", "center") or "center"),
        hflip=_default_hflip(raw) if hflip is None else bool(hflip),
        scale=tuple(train_scale) if train_scale is not None else raw.scale,  # type: ignore[arg-type]
        augment=augment,
    )
    use_cache = cache or raw.layout == "digits"
    train_ds: torch.utils.data.Dataset
    val_ds: torch.utils.data.Dataset
    test_ds: torch.utils.data.Dataset | None
    if use_cache:
        train_ds, val_ds, test_ds = cached_splits(pre, train_s, val_s, raw.test, skip_bad, skipped)
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
