"""Transforms: timm's factory for PIL images, and the tensor versions the cache augments with.

Train: random-resized-crop with scale (0.35, 1) (digits: (0.7, 1)), optional horizontal flip, no
colour jitter or auto-augment. Eval: resize to ``img_size / crop_pct`` then centre crop
(:func:`eval_transform`, the one evaluation transform of validation, test, predict and serving).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

DEFAULT_TRAIN_SCALE = (0.35, 1.0)  # random-resized-crop area range
TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def eval_transform(input_config: dict, *, normalize: bool = True) -> Callable:
    """The evaluation transform of a task: RGB PIL image -> ``(3, img_size, img_size)`` tensor.

    ``input_config`` holds ``img_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct`` and
    ``crop_mode`` (timm's ``center``/``squash``/``border``; ``center`` when absent), as a run's
    ``run.json`` "data" and an adapter's ``adapter_config.json`` "input" record them. Validation,
    test, ``nettailor predict``, ``load_export`` users and ``examples/serve.py`` all use this one
    function. ``normalize=False`` returns uint8 (the cache stores it and normalises later).
    """
    from timm.data import create_transform

    return create_transform(int(input_config["img_size"]), is_training=False,
                            interpolation=str(input_config["interpolation"]),
                            mean=tuple(input_config["mean"]), std=tuple(input_config["std"]),
                            crop_pct=float(input_config["crop_pct"]),
                            crop_mode=str(input_config.get("crop_mode") or "center"), normalize=normalize)


class Normalize:
    """uint8 ``(3, H, W)`` tensor -> float32 ``(3, H, W)``: ``(x / 255 - mean) / std``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) / 255.0 - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class TensorTrainTransform:
    """Train augmentation on a uint8 ``(3, S, S)`` tensor -> float32 ``(3, img_size, img_size)``.

    Random-resized-crop (``scale``, ``ratio``, antialiased), optional horizontal flip, normalise.
    Uses torch's RNG (DataLoader seeds it per worker).
    """

    def __init__(self, img_size: int, scale: tuple[float, float], ratio: tuple[float, float],
                 interpolation: str, hflip: bool, mean: Sequence[float], std: Sequence[float]):
        from torchvision.transforms import v2

        self.img_size = img_size
        ops: list[Any] = [v2.RandomResizedCrop(img_size, scale=scale, ratio=ratio,
                                               interpolation=_tv_interp(interpolation), antialias=True)]
        if hflip:
            ops.append(v2.RandomHorizontalFlip(0.5))
        self.aug = v2.Compose(ops)
        self.normalize = Normalize(mean, std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.aug(x))


class TensorCenterCrop:
    """``--no-augment`` on the cache: centre crop to ``img_size`` and normalise (picklable for workers)."""

    def __init__(self, img_size: int, normalize: Normalize):
        self.img_size, self.normalize = img_size, normalize

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2.functional import center_crop

        return self.normalize(center_crop(x, [self.img_size, self.img_size]))


def _tv_interp(name: str):
    from torchvision.transforms import InterpolationMode

    return {
        "nearest": InterpolationMode.NEAREST,
        "bicubic": InterpolationMode.BICUBIC,
        "lanczos": InterpolationMode.BILINEAR,  # not supported on tensors
        "box": InterpolationMode.BILINEAR,
        "hamming": InterpolationMode.BILINEAR,
    }.get(name, InterpolationMode.BILINEAR)


def interp_name(name: Any) -> str:
    """timm interpolation name usable by both PIL and tensor resizes ('random'/unknown -> bilinear)."""
    name = str(name or "bilinear").lower()
    return name if name in ("nearest", "bilinear", "bicubic") else "bilinear"


@dataclass
class Preproc:
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    crop_mode: str
    hflip: bool
    scale: tuple[float, float]
    augment: bool = True

    @property
    def scale_size(self) -> int:
        """Shorter side before the eval center crop (timm: ``floor(img_size / crop_pct)``)."""
        return max(self.img_size, math.floor(self.img_size / self.crop_pct))

    def eval_prep(self) -> Callable:
        """PIL RGB -> uint8 ``(3, img_size, img_size)``: timm eval transform without normalisation."""
        return eval_transform({"img_size": self.img_size, "mean": self.mean, "std": self.std,
                               "interpolation": self.interpolation, "crop_pct": self.crop_pct,
                               "crop_mode": self.crop_mode}, normalize=False)

    def train_prep(self) -> Callable:
        """PIL RGB -> uint8 ``(3, img_size, img_size)``: timm train transform without normalisation."""
        from timm.data import create_transform

        if not self.augment:  # --no-augment: train images as the evaluation sees them
            return self.eval_prep()

        return create_transform(self.img_size, is_training=True, scale=self.scale, ratio=TRAIN_RATIO,
                                hflip=0.5 if self.hflip else 0.0, vflip=0.0,
                                color_jitter=None,  # type: ignore[arg-type]  # timm: None = no jitter
                                auto_augment=None, re_prob=0.0, interpolation=self.interpolation,
                                mean=self.mean, std=self.std, normalize=False)

    def cache_train_prep(self) -> Callable:
        """PIL RGB -> uint8 ``(3, S, S)``, ``S = scale_size``: what the train cache stores."""
        from timm.data import create_transform

        return create_transform(self.scale_size, is_training=False, interpolation=self.interpolation,
                                mean=self.mean, std=self.std, crop_pct=1.0, crop_mode="center",
                                normalize=False)

    def normalize(self) -> Normalize:
        return Normalize(self.mean, self.std)

    def tensor_train(self) -> Callable:
        if not self.augment:
            return TensorCenterCrop(self.img_size, self.normalize())
        return TensorTrainTransform(self.img_size, self.scale, TRAIN_RATIO, self.interpolation, self.hflip,
                                    self.mean, self.std)
