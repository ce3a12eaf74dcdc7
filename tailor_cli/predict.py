"""Serving: run several tasks' tailored networks, sharing one backbone, on images from disk."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .adapter import load_export
from .data import IMG_EXTENSIONS, eval_transform, open_image
from .data.samples import UNREADABLE
from .errors import DataError

IMAGE_SUFFIXES = set(IMG_EXTENSIONS)  # the extensions training reads


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given, folders expanded (recursively, sorted) to the images they hold."""
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            out.append(path)
        else:
            raise DataError(f"image path '{path}' does not exist")
    if not out:
        raise DataError(f"no images found in {', '.join(map(str, paths))}")
    return out


def _open_rgb(path: Path) -> Image.Image:
    try:
        return open_image(path)  # as training read it (16-bit PNGs scaled, not saturated)
    except UNREADABLE as err:
        raise DataError(f"cannot read image '{path}' ({type(err).__name__}); remove it, convert it, or pass "
                        "--skip-bad") from err


@torch.inference_mode()
def predict(export_dir: Path, images: list[Path], *, tasks: list[str] | None = None, top_k: int = 5,
            batch_size: int = 32, device: torch.device | str = "cpu", skip_bad: bool = False) -> dict:
    """Top-k classes per image and task. Returns ``{"tasks": [...], "predictions": [...], "skipped": [...]}``.

    Each image is decoded once and every task runs on it (each with its own input transform);
    predictions are listed task by task, images in order. With ``skip_bad`` an image that cannot be
    read is left out and listed in ``skipped`` (image, reason) instead of stopping the run."""
    files = collect_images(images)
    backbone, loaded = load_export(export_dir, tasks, device=device)
    transforms = {name: eval_transform(config["input"]) for name, (_, config) in loaded.items()}
    results: dict[str, list[dict]] = {name: [] for name in loaded}
    skipped: list[dict] = []
    for start in range(0, len(files), batch_size):
        chunk, pictures = [], []
        for path in files[start:start + batch_size]:
            try:
                pictures.append(_open_rgb(path))
            except DataError as err:
                if not skip_bad:
                    raise
                skipped.append({"image": str(path), "reason": str(err.__cause__ or err)})
                continue
            chunk.append(path)
        if not chunk:
            continue
        for name, (model, config) in loaded.items():
            classes = config["classes"]
            batch = torch.stack([transforms[name](p) for p in pictures]).to(backbone.device)
            values, indices = model(batch).float().softmax(dim=1).topk(min(top_k, len(classes)), dim=1)
            for path, v, i in zip(chunk, values.tolist(), indices.tolist()):
                results[name].append({"image": str(path), "task": name,
                                      "top": [{"class": classes[c], "index": c, "prob": p} for p, c in zip(v, i)]})
    if len(skipped) == len(files):
        raise DataError(f"none of the {len(files)} images could be read (first: {skipped[0]['image']}: "
                        f"{skipped[0]['reason']})")
    inputs = {name: {key: config["input"].get(key) for key in ("img_size", "mean", "std", "interpolation", "crop_pct",
                                                                "expects")} for name, (_, config) in loaded.items()}
    return {"export_dir": str(export_dir), "tasks": list(loaded), "images": len(files) - len(skipped), "inputs": inputs,
            "predictions": [row for rows in results.values() for row in rows], "skipped": skipped}
