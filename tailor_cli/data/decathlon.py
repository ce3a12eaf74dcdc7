"""Visual Decathlon: ``annotations/<task>_{train,val}.json`` (COCO-style) and ``data/``."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from .raw import RawTask
from .samples import FileSamples


def _load_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}); re-extract the annotations") from None


def _decathlon_tasks(root: Path) -> list[str]:
    return sorted(p.name[: -len("_train.json")] for p in (root / "annotations").glob("*_train.json"))


def _decathlon_split(root: Path, doc: dict, first_id: int, n_classes: int, where: str,
                     skip_bad: bool, skipped: list[str]) -> FileSamples:
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
    return FileSamples(root_r, rels, labels)


def read_decathlon(root: Path, task: str | None, skip_bad: bool, skipped: list[str]) -> RawTask:
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
    return RawTask(name=task, layout="decathlon", classes=classes, train=train, val=val,
                    source=str(root.resolve()))
