"""Checks on option values and on the files of a dataset, each failing with a one-line error."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError, UsageError
from .samples import FileSamples, Samples, bad_image_msg

MIN_IMG_SIZE = 8


def check_img_size(img_size: int | None) -> None:
    """An explicit ``img_size`` (``--img-size``) must be at least 8; 0 is not "default"."""
    if img_size is not None and int(img_size) < MIN_IMG_SIZE:
        raise UsageError(f"image size {int(img_size)} is too small; pass --img-size 32 or more")


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:  # also refuses NaN
        raise UsageError(f"--val-fraction must be between 0 and 1, both excluded (got {val_fraction}); "
                         f"pass e.g. 0.1")


def check_split_seed(seed: int) -> None:
    if seed < 0:
        raise UsageError(f"--split-seed must be 0 or more, got {seed}")


def _check_header(path: Path) -> BaseException | None:
    """Cheap integrity check: PIL header parse + ``verify()`` (CRC for PNG). Returns the error."""
    try:
        with open(path, "rb") as f:
            with Image.open(f) as img:
                img.verify()
        return None
    except Exception as e:  # PIL raises a zoo of types for broken files
        return e


def _check_decode(samples: FileSamples, i: int) -> BaseException | None:
    """Full check: decode item ``i`` exactly as the loader will (``samples.load``). Returns the error."""
    try:
        samples.load(i)
        return None
    except Exception as e:  # PIL raises a zoo of types for broken files
        return e.with_traceback(None)  # the traceback would keep the frames (and the image) alive


def verify_files(samples: FileSamples, skip_bad: bool, skipped: list[str]) -> FileSamples:
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
        raise DataError(bad_image_msg(samples.rels[i] + more, errors[i]))  # type: ignore[arg-type]
    skipped.extend(samples.rels[i] for i in bad)
    bad_set = set(bad)
    return samples.subset([i for i in range(len(samples)) if i not in bad_set])


def check_classes_present(samples: Samples, classes: list[str], where: str) -> None:
    counts = np.bincount(np.asarray(samples.labels, dtype=np.int64), minlength=len(classes))
    empty = [classes[i] for i in range(len(classes)) if counts[i] == 0]
    if empty:
        raise DataError(f"class {empty[0]!r} has no readable images in {where}"
                        f"{f' (also {empty[1:]})' if len(empty) > 1 else ''}; "
                        f"add images or remove the class folder")


def check_expected(classes: list[str], expected: list[str] | None) -> None:
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


def check_no_task(task: str | None, data: str, kind: str) -> None:
    """``task`` only selects a Visual Decathlon task; anywhere else it would be silently ignored."""
    if task is not None:
        raise UsageError(f"--task applies only to Visual Decathlon data (a folder with annotations/ and data/); "
                         f"{data} is {kind}; drop --task {task}")
