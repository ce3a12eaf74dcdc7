"""``--cache``: every image decoded and resized once into uint8 tensors held in memory."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from ..errors import DataError
from .datasets import CachedImageDataset
from .samples import UNREADABLE, Samples, bad_image_msg
from .transforms import Preproc

_CACHE_PROBE = 16  # items decoded serially to decide whether threads pay off


_CACHE_THREAD_MIN_S = 0.0015


def build_cache(samples: Samples, prep: Callable, *, skip_bad: bool = False,
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
        except UNREADABLE as e:
            return e

    n = len(samples)
    images: torch.Tensor | None = None
    bad: dict[int, BaseException] = {}

    def store(i: int, item: torch.Tensor | BaseException) -> None:
        nonlocal images
        if not isinstance(item, torch.Tensor):
            if not skip_bad:
                raise DataError(bad_image_msg(samples.describe(i), item))
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


def cached_splits(pre: Preproc, train_s: Samples, val_s: Samples, test_s: Samples | None,
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
