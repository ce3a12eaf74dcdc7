"""Train/validation splits we make: stratified per class (per GTSRB track), seeded, and with a
split file written once (atomically) and re-read exactly by every later stage."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..checkpoint import write_json
from ..errors import DataError
from .checks import check_val_fraction
from .raw import RawTask
from .samples import Samples

SPLIT_FORMAT = "nettailor-split/1"


def make_split(labels: Sequence[int], val_fraction: float, seed: int,
               groups: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """Stratified, seeded train/val split of item indices.

    Per class, whole groups (e.g. GTSRB tracks; each item its own group when ``groups`` is None)
    are shuffled and ``round(val_fraction * n_groups)`` go to val, clamped to ``[1, n_groups - 1]``
    when a class has at least 2 groups (a class with one group stays in train).

    Returns:
        ``(train_idx, val_idx)``, each sorted.
    """
    check_val_fraction(val_fraction)
    rng = np.random.default_rng(seed)
    y = np.asarray(labels, dtype=np.int64)
    keys = list(groups) if groups is not None else [str(i) for i in range(len(y))]
    train_idx: list[int] = []
    val_idx: list[int] = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
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


def _read_split_file(split_file: Path, raw: RawTask, skipped: list[str]) -> tuple[list[int], list[int]]:
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


def split_train(raw: RawTask, split_file: Path | None, val_fraction: float, seed: int,
           skipped: list[str]) -> tuple[Samples, Samples, str]:
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
