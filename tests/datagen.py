"""Tiny synthetic datasets on disk, in the layouts ``tailor_cli.data`` understands.

Every generator is deterministic (seeded) and fast: a few dozen small images.
Images are *learnable* in a couple of epochs by a tiny CNN: class ``k`` gets its
own mean colour and its own stripe orientation/frequency, plus mild noise.

Import as ``from datagen import make_imagefolder`` (tests/ on ``sys.path``), or::

    sys.path.insert(0, str(Path(__file__).parent)); import datagen

Sizes follow PIL's convention: ``size=(width, height)``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "class_image",
    "make_imagefolder",
    "make_gtsrb",
    "make_decathlon",
    "write_truncated",
    "write_garbage",
]

# Well separated hues; classes beyond the palette get a seeded random colour.
_PALETTE = np.array(
    [
        [220, 40, 40], [40, 200, 60], [50, 70, 230], [230, 210, 40], [200, 50, 210],
        [40, 210, 220], [240, 140, 30], [120, 120, 120], [250, 250, 250], [20, 20, 20],
    ],
    dtype=np.float32,
)


def _class_colour(k: int) -> np.ndarray:
    if k < len(_PALETTE):
        return _PALETTE[k]
    return np.random.default_rng(1000 + k).uniform(0, 255, 3).astype(np.float32)


def class_image(k: int, size: tuple[int, int] = (40, 36), rng: np.random.Generator | None = None,
                mode: str = "RGB") -> Image.Image:
    """One synthetic image of class ``k``.

    Args:
        k: class index (>= 0).
        size: (width, height).
        rng: noise source (a fresh seeded one when None).
        mode: PIL mode of the result: "RGB", "L", "P" or "RGBA".

    Returns:
        PIL image of ``size`` in ``mode``: class colour blended with oriented stripes + noise.
    """
    rng = rng if rng is not None else np.random.default_rng(k)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = np.pi * (k % 4) / 4 + rng.uniform(-0.1, 0.1)
    freq = 2 * np.pi / (4 + 2 * (k // 4 % 3))
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)  # (H, W)
    colour = _class_colour(k)
    img = colour[None, None, :] * (0.55 + 0.45 * stripes[..., None])  # (H, W, 3)
    img = img + rng.normal(0, 12, size=img.shape)
    arr = np.clip(img, 0, 255).astype(np.uint8)
    pil = Image.fromarray(arr, "RGB")
    if mode == "RGB":
        return pil
    if mode == "P":
        return pil.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return pil.convert(mode)


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def make_imagefolder(root: Path, n_classes: int = 3, per_class: int = 10, size: tuple[int, int] = (40, 36),
                     split: bool = True, mode: str = "RGB", seed: int = 0) -> Path:
    """Write an ImageFolder tree of PNGs.

    ``split=True``: ``root/train/class_k/*.png`` (``per_class`` each) and ``root/val/class_k/*.png``
    (``max(2, per_class // 3)`` each). ``split=False``: ``root/class_k/*.png`` (flat).

    Returns:
        ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = {"train": per_class, "val": max(2, per_class // 3)} if split else {"": per_class}
    for sub, count in splits.items():
        for k in range(n_classes):
            folder = (root / sub if sub else root) / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _save(class_image(k, size, rng, mode), folder / f"img_{i:04d}.png")
    return root


_GTSRB_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


def _gtsrb_row(name: str, size: tuple[int, int], class_id: int) -> str:
    w, h = size
    return f"{name};{w};{h};{min(5, w - 1)};{min(5, h - 1)};{max(0, w - 6)};{max(0, h - 6)};{class_id}\n"


def make_gtsrb(root: Path, n_classes: int = 3, tracks_per_class: int = 3, frames_per_track: int = 4,
               size: tuple[int, int] = (30, 32), test_per_class: int = 3, seed: int = 0) -> Path:
    """Write the GTSRB layout (as in the official zips that torchvision extracts).

    - ``root/GTSRB/Training/000NN/TTTTT_FFFFF.ppm`` plus ``root/GTSRB/Training/000NN/GT-000NN.csv``
    - ``root/GTSRB/Final_Test/Images/NNNNN.ppm`` plus ``root/GTSRB/Final_Test/Images/GT-final_test.csv``

    CSVs are ``;``-separated with header ``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``.
    Frames of a track share their noise seed so they look alike (as real tracks do).

    Returns:
        ``root`` (the folder holding ``GTSRB/``).
    """
    root = Path(root)
    base = root / "GTSRB"
    for c in range(n_classes):
        folder = base / "Training" / f"{c:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = [_GTSRB_HEADER]
        for t in range(tracks_per_class):
            for f in range(frames_per_track):
                rng = np.random.default_rng([seed, c, t, f])
                name = f"{t:05d}_{f:05d}.ppm"
                _save(class_image(c, size, rng), folder / name)
                rows.append(_gtsrb_row(name, size, c))
        (folder / f"GT-{c:05d}.csv").write_text("".join(rows))
    test_dir = base / "Final_Test" / "Images"
    test_dir.mkdir(parents=True, exist_ok=True)
    rows = [_GTSRB_HEADER]
    rng = np.random.default_rng([seed, 99])
    for i in range(n_classes * test_per_class):
        c = i % n_classes
        name = f"{i:05d}.ppm"
        _save(class_image(c, size, rng), test_dir / name)
        rows.append(_gtsrb_row(name, size, c))
    (test_dir / "GT-final_test.csv").write_text("".join(rows))
    return root


def make_decathlon(root: Path, tasks: tuple[str, ...] = ("gtsrb", "svhn"), n_classes: int = 3,
                   per_class: int = 4, size: tuple[int, int] = (24, 24), seed: int = 0) -> Path:
    """Write the Visual Decathlon layout.

    - ``root/annotations/<task>_{train,val,test_stripped}.json`` (COCO style: ``images``
      [{id, file_name, width, height}], ``annotations`` [{id, image_id, category_id}],
      ``categories`` [{id, name}]); ``test_stripped`` has no annotations.
    - Task ``i`` uses category ids ``(i+1)*10000 + 1 ...``; image ids are offset the same way.
    - ``file_name`` is relative to ``root``: ``data/<task>/<split>/<cat:06d>/<n:06d>.png``.

    ``train`` gets ``per_class`` images per class; ``val`` and ``test`` ``max(2, per_class // 2)``.

    Returns:
        ``root``.
    """
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for ti, task in enumerate(tasks):
        base_id = (ti + 1) * 10000
        categories = [{"id": base_id + 1 + c, "name": f"{task}_c{c}"} for c in range(n_classes)]
        counts = {"train": per_class, "val": max(2, per_class // 2), "test": max(2, per_class // 2)}
        next_id = base_id * 100
        for split, count in counts.items():
            rng = np.random.default_rng([seed, ti, len(split)])
            images, anns = [], []
            for c in range(n_classes):
                for i in range(count):
                    next_id += 1
                    rel = f"data/{task}/{split}/{c + 1:06d}/{next_id:08d}.png"
                    _save(class_image(c, size, rng), root / rel)
                    images.append({"id": next_id, "file_name": rel, "width": size[0], "height": size[1]})
                    anns.append({"id": next_id, "image_id": next_id, "category_id": base_id + 1 + c,
                                 "segmentation": [], "area": size[0] * size[1], "iscrowd": 0})
            doc = {"info": {"description": f"synthetic {task}"}, "images": images, "categories": categories}
            doc["annotations"] = anns if split != "test" else []
            name = f"{task}_{split}.json" if split != "test" else f"{task}_test_stripped.json"
            (root / "annotations" / name).write_text(json.dumps(doc))
    return root


def write_truncated(path: Path, size: tuple[int, int] = (40, 36), keep: float = 0.5) -> Path:
    """Write a PNG at ``path`` cut to ``keep`` of its bytes (header intact, data truncated)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    _save(class_image(0, size), tmp)
    data = tmp.read_bytes()
    tmp.unlink()
    path.write_bytes(data[: max(64, int(len(data) * keep))])
    return path


def write_garbage(path: Path) -> Path:
    """Write a file with an image extension that is not an image at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image\n" * 10)
    return path


def randomise_bn_stats(model):
    """Non-trivial BatchNorm running statistics (seeded), so that a conversion or a copy that
    re-initialised them, or an activation moved to the wrong place, shows in the output."""
    import torch

    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model
