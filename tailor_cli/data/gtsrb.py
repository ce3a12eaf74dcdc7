"""GTSRB as torchvision lays it out: ``GTSRB/Training/000NN/*.ppm`` with a CSV per class, and
``GTSRB/Final_Test/Images`` with ``GT-final_test.csv``. The validation split is made by track."""
from __future__ import annotations

import csv
from pathlib import Path

from ..errors import DataError
from .raw import RawTask
from .samples import FileSamples, subdirs

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


def find_gtsrb(path: Path) -> Path | None:
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


def read_gtsrb(base: Path, skip_bad: bool, skipped: list[str]) -> RawTask:
    training = base / "GTSRB" / "Training"
    dirs = [d for d in subdirs(training) if d.name.isdigit()]
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
    train = FileSamples(base, rels, labels)
    test = _read_gtsrb_test(base, dirs, skip_bad, skipped)
    return RawTask(name="gtsrb", layout="gtsrb", classes=classes, train=train, val=None, test=test,
                    groups=groups, source=str(base))


def _read_gtsrb_test(base: Path, dirs: list[Path], skip_bad: bool, skipped: list[str]) -> FileSamples | None:
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
    return FileSamples(base, rels, labels)
