"""Choosing between networks on a validation set that can only resolve so much.

The paper keeps the leanest network whose validation accuracy is within 0.5 points of the
teacher's. Its test sets were large (SVHN: 26k images, so 0.5 points is 130 images); on a
few hundred validation images the same rule turns on one or two images, and noise decides.

:func:`compare` makes the decision a paired one: both networks are evaluated on the same
images, and the candidate is rejected only when it is worse than the reference by more than
the tolerance *and* by more than the noise of that paired difference (a one-sided bound at
``z`` standard errors of the per-image differences). A candidate that differs from the
reference on one image, or on two of a few hundred, is never rejected for it; a candidate
that loses many images is.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

Z_ONE_SIDED_95 = 1.645


@dataclass(frozen=True)
class Comparison:
    """A candidate against a reference on the same ``n`` images (accuracies in %)."""

    n: int
    candidate_acc: float
    reference_acc: float
    diff: float  # candidate - reference, points
    margin: float  # noise allowance, points (z standard errors of the paired difference)
    tolerance: float  # points allowed below the reference on top of the noise
    only_candidate: int  # images the candidate gets right and the reference wrong
    only_reference: int  # and the other way round
    accepted: bool  # the decision: diff >= -(tolerance + margin)
    within_tolerance: bool  # the measured difference alone: diff >= -tolerance (never counts the noise)

    def to_json(self) -> dict:
        return asdict(self)


def compare(candidate: torch.Tensor, reference: torch.Tensor, *, tolerance: float,
            z: float = Z_ONE_SIDED_95) -> Comparison:
    """Is ``candidate`` within ``tolerance`` points of ``reference``, allowing for noise?

    ``candidate`` and ``reference`` are per-image correctness (bool or 0/1) on the same images in
    the same order. Accepted when ``diff >= -(tolerance + z * SE)``, with ``SE`` the standard error
    of the mean of the per-image differences (in points); ``z = 0`` asks for the measured
    difference alone (``accepted == within_tolerance``).
    """
    c, r = candidate.reshape(-1).double(), reference.reshape(-1).double()
    if c.numel() != r.numel() or c.numel() == 0:
        raise ValueError(f"need the same non-zero number of images, got {c.numel()} and {r.numel()}")
    n = c.numel()
    d = c - r
    diff = 100.0 * d.mean().item()
    se = 100.0 * d.std(unbiased=True).item() / math.sqrt(n) if n > 1 else 0.0
    margin = z * se
    return Comparison(
        n=n, candidate_acc=100.0 * c.mean().item(), reference_acc=100.0 * r.mean().item(), diff=diff,
        margin=margin, tolerance=tolerance, only_candidate=int((d > 0).sum().item()),
        only_reference=int((d < 0).sum().item()), accepted=diff >= -(tolerance + margin) - 1e-9,
        within_tolerance=diff >= -tolerance - 1e-9,
    )


def resolution_warning(n: int, tolerance: float, *, min_images: float = 3.0) -> str | None:
    """A warning when ``tolerance`` points span fewer than ``min_images`` of ``n`` validation images.

    One image is ``100 / n`` points. When the tolerance is one or two images, whether a network
    passes it can turn on a single image that another seed gets right or wrong. The message states
    the arithmetic and what would span ``min_images``; it promises nothing more (a larger split did
    not make the digits' networks agree: docs/method.md, session 14). None when the split resolves
    the tolerance.
    """
    per_image = 100.0 / n
    if tolerance >= min_images * per_image:
        return None
    allowed = math.floor(tolerance / per_image + 1e-9)
    return (f"the validation split has {n} images: one image is {per_image:.2f} points, so --tolerance {tolerance:g} "
            f"allows {allowed} image{'' if allowed == 1 else 's'} and whether a network passes can turn on a single "
            f"image; spanning {min_images:g} images takes --tolerance {math.ceil(min_images * per_image * 100) / 100:g}, "
            f"or a validation split of {math.ceil(min_images * 100 / tolerance)} images (--val-fraction, or a val/ folder)")
