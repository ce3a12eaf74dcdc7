"""Training objectives: images, labels -> (loss, logits, named terms), one per kind of stage.

:func:`tailor_cli.train.fit` trains any callable of that shape that names its terms in
``terms`` (each is averaged over the epoch into ``metrics.jsonl`` as ``train_<term>``). An
objective may also have ``epoch_record() -> dict``: fields added to each epoch's metrics row
(the student's attention, so that its evolution can be read back).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .losses import ComplexityModel, logit_distillation, teacher_term
from .student import Student, teacher_forward


class Objective(Protocol):
    """What :func:`tailor_cli.train.fit` trains: a callable that names its terms."""

    terms: tuple[str, ...]  # the keys of the returned dict, in the order metrics.jsonl lists them

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                            dict[str, torch.Tensor]]: ...


class TeacherObjective:
    """Plain fine-tuning: cross-entropy of the whole network."""

    terms: tuple[str, ...] = ("ce",)

    def __init__(self, model: nn.Module, forward: Callable[..., Any] | None = None, label_smoothing: float = 0.0):
        self.model = model
        self.forward = forward if forward is not None else model  # DDP and/or compiled wrapper
        self.label_smoothing = label_smoothing

    def __call__(self, images, labels):
        logits = self.forward(images)
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return ce, logits, {"ce": ce}


class StudentObjective:
    """CE + g1 * E[C] + g2 * Omega (+ kd_weight * KD). The teacher runs once per step without autograd.

    KD is :func:`tailor_cli.losses.logit_distillation` of the teacher's logits at
    ``kd_temperature``, next to the feature term (off when ``kd_weight`` is 0).
    """

    def __init__(
        self,
        student: Student,
        teacher: nn.Module | None,
        teacher_chain,
        complexity: ComplexityModel | None,
        complexity_weight: float,
        teacher_weight: float,
        forward: Callable[..., Any] | None = None,
        teacher_loss: str = "mse",
        label_smoothing: float = 0.0,
        kd_weight: float = 0.0,
        kd_temperature: float = 4.0,
    ):
        self.label_smoothing = label_smoothing
        self.kd_weight, self.kd_temperature = kd_weight, kd_temperature
        self.student, self.teacher, self.chain = student, teacher, teacher_chain
        self.forward = forward if forward is not None else student  # DDP and/or compiled wrapper
        self.complexity = complexity
        self.g1, self.g2 = complexity_weight, teacher_weight
        self.teacher_loss = teacher_loss
        if (self.g2 > 0 or self.kd_weight > 0) and teacher is None:
            raise ValueError("a teacher is required when teacher_weight or kd_weight > 0")
        if self.g1 > 0 and complexity is None:
            raise ValueError("a complexity model is required when complexity_weight > 0")
        self.terms = (("ce",) + (("complexity",) if self.g1 > 0 else ()) + (("teacher",) if self.g2 > 0 else ())
                      + (("kd",) if self.kd_weight > 0 else ()))

    def __call__(self, images, labels):
        alphas = self.student.attention()  # once per step, shared by forward and E[C]
        if self.g2 > 0 or self.kd_weight > 0:
            with torch.inference_mode():
                t_logits, t_feats = teacher_forward(self.teacher, self.chain, images)
        if self.g2 > 0:
            logits, feats = self.forward(images, alphas=alphas, return_features=True)
        else:
            logits = self.forward(images, alphas=alphas)
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        loss, terms = ce, {"ce": ce}
        if self.g1 > 0:
            ec = self.complexity(alphas)
            loss = loss + self.g1 * ec
            terms["complexity"] = ec
        if self.g2 > 0:
            omega = teacher_term(logits, feats, t_logits, t_feats, kind=self.teacher_loss)
            loss = loss + self.g2 * omega
            terms["teacher"] = omega
        if self.kd_weight > 0:
            kd = logit_distillation(logits, t_logits, self.kd_temperature)
            loss = loss + self.kd_weight * kd
            terms["kd"] = kd
        return loss, logits, terms


    def epoch_record(self) -> dict:
        """Each layer's attention over its surviving paths (None for a dropped layer), for ``metrics.jsonl``."""
        return {"attention": [a.tolist() if a is not None else None for a in self.student.attention()]}
