"""Which layout a ``--data`` value is, and the readers of the embedded digits and image folders.

GTSRB, Visual Decathlon and torchvision datasets have a module each. Readers list files and
labels; nothing is decoded here.
"""
from __future__ import annotations

import io
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import DataError
from .checks import check_no_task
from .decathlon import read_decathlon
from .gtsrb import find_gtsrb, read_gtsrb
from .raw import RawTask
from .samples import IMG_EXTENSIONS, ArraySamples, FileSamples, images_in, is_image, subdirs
from .split import make_split
from .torchvision_sets import read_torchvision

DIGITS_IMG_SIZE = 32


DIGITS_TEST_FRACTION = 0.2


EMBEDDED_DIGITS = "digits"  # the bare name: always the embedded set (a folder of that name is given as ./digits)
DIGITS_TEST_SEED = 20190601  # fixed: the digits test split never depends on the run's --seed


DIGITS_TRAIN_SCALE = (0.7, 1.0)

# What the images of a layout look like, for a user feeding the exported task new ones (``predict``).
INPUT_NOTES = {"digits": "light strokes on a dark background, one centred digit per image (as trained: the "
                         "embedded 8x8 UCI digits, upscaled)"}


def _read_digits() -> RawTask:
    ref = resources.files("tailor_cli") / "assets" / "digits.npz"
    with ref.open("rb") as f:
        npz = np.load(io.BytesIO(f.read()))
        images, labels = np.asarray(npz["images"], dtype=np.uint8), np.asarray(npz["labels"], dtype=np.int64)
    # A fixed held-out test split (the same for every --seed and --val-fraction), reported only:
    # 20% of each class, 359 of the 1,797 images. Validation is carved from the other 1,438.
    samples = ArraySamples(images, labels.tolist())
    rest, test = make_split(samples.labels, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    return RawTask(name="digits", layout="digits", classes=[str(i) for i in range(10)],
                    train=samples.subset(rest), val=None, test=samples.subset(test),
                    preferred_size=DIGITS_IMG_SIZE, crop_pct=1.0, interpolation="bilinear",
                    scale=DIGITS_TRAIN_SCALE, source="embedded")


def _class_folders(folder: Path, where: str) -> tuple[list[str], list[list[Path]]]:
    """Class folders directly under ``folder`` and their images. Raises on empty/unusable trees."""
    dirs = subdirs(folder)
    if not dirs:
        if any(is_image(p) for p in folder.iterdir() if p.is_file()):
            raise DataError(f"{where} has images but no class folders; put each class's images in "
                            f"its own subfolder ({where}/<class>/...)")
        raise DataError(f"{where} is empty; it needs one subfolder of images per class")
    files = [images_in(d) for d in dirs]
    for d, fs in zip(dirs, files):
        if not fs:
            raise DataError(f"class folder {where}/{d.name} has no images ({', '.join(IMG_EXTENSIONS[:4])}...); "
                            f"add images or remove the folder")
    return [d.name for d in dirs], files


def _folder_samples(root: Path, files: list[list[Path]]) -> FileSamples:
    rels, labels = [], []
    for k, fs in enumerate(files):
        for p in fs:
            rels.append(p.relative_to(root).as_posix())
            labels.append(k)
    return FileSamples(root, rels, labels)


def _read_imagefolder(path: Path) -> RawTask:
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
        return RawTask(name=name, layout="imagefolder", classes=classes, train=train, val=val, test=test,
                        source=str(path))
    classes, files = _class_folders(path, path.name)
    return RawTask(name=name, layout="imagefolder-flat", classes=classes,
                    train=_folder_samples(path, files), val=None, source=str(path))


def _split_folder(root: Path, folder: Path, classes: list[str]) -> FileSamples:
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
    return FileSamples(root, rels, labels)


def read_task(data: str, task: str | None, download: bool, root_for_download: Path | None,
               skip_bad: bool, skipped: list[str]) -> RawTask:
    """Detect the layout of ``data`` and read its file lists (no image decoding)."""
    if data == EMBEDDED_DIGITS:  # whatever the working directory holds: a run directory may be called digits
        check_no_task(task, data, "the embedded digits")
        return _read_digits()
    if data.startswith("torchvision:"):
        check_no_task(task, data, "a torchvision dataset")
        return read_torchvision(data, download, root_for_download)
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"data path {data} does not exist; pass an image folder, 'digits' (embedded), or "
                        "torchvision:NAME")
    if not path.is_dir():
        raise DataError(f"data path {data} is a file, not a folder; pass the folder that holds the class folders")
    path = path.resolve()
    if (path / "annotations").is_dir() and (path / "data").is_dir():
        return read_decathlon(path, task, skip_bad, skipped)
    gtsrb = find_gtsrb(path)
    if gtsrb is not None:
        check_no_task(task, data, "GTSRB data")
        return read_gtsrb(gtsrb, skip_bad, skipped)
    check_no_task(task, data, "an image folder")
    return _read_imagefolder(path)
