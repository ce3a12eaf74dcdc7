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
split) are stratified per class and seeded (by ``--split-seed``, not the training seed). With
``split_file`` they are written once (atomically) and re-read exactly by every later stage.

Transforms come from ``timm.data.create_transform`` with the backbone's data config (mean, std,
interpolation, crop_pct). Train: random-resized-crop with scale (0.35, 1) (digits: (0.7, 1)),
optional horizontal flip, no colour jitter / auto-augment. Eval: resize to ``img_size / crop_pct``
then center crop. With ``cache=True`` every image is decoded and resized ONCE into uint8 tensors
``(N, 3, H, W)`` and the per-epoch augmentation runs on tensors (``torchvision.transforms.v2``).

Modules, in import order (each imports only those above it): ``samples`` (sample sources,
``open_image``), ``transforms`` (timm's factory, tensor augmentation, ``eval_transform``), ``raw``
(what a reader returns), ``datasets`` (``TaskData``), ``checks``, ``split``, ``gtsrb``,
``decathlon``, ``torchvision_sets``, ``layouts`` (detection, digits, image folders), ``cache``,
``task`` (``load_task_data``), ``loader``.

Every problem with the data raises ``DataError`` with a one-line message; a bad option value
(``img_size``, ``val_fraction``, ``task`` for data that has no tasks) raises ``UsageError``.
Nothing here prints.
"""
from __future__ import annotations

from .cache import available_memory_bytes, build_cache, check_cache_fits
from .datasets import CachedImageDataset, ImageDataset, TaskData
from .gtsrb import GTSRB_CLASSES
from .layouts import DIGITS_TEST_FRACTION, DIGITS_TEST_SEED, INPUT_NOTES
from .loader import default_num_workers, make_loader
from .samples import IMG_EXTENSIONS, open_image
from .split import make_split
from .task import load_task_data
from .torchvision_sets import TORCHVISION_DATASETS
from .transforms import eval_transform

__all__ = [
    "DIGITS_TEST_FRACTION",
    "DIGITS_TEST_SEED",
    "GTSRB_CLASSES",
    "IMG_EXTENSIONS",
    "INPUT_NOTES",
    "TORCHVISION_DATASETS",
    "CachedImageDataset",
    "ImageDataset",
    "TaskData",
    "available_memory_bytes",
    "build_cache",
    "check_cache_fits",
    "default_num_workers",
    "eval_transform",
    "load_task_data",
    "make_loader",
    "make_split",
    "open_image",
]
