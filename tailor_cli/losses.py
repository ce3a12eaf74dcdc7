"""The three terms of the NetTailor loss: L = CE + g1 * E[C] + g2 * Omega (docs/method.md, "The loss")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .structure import Structure


class ComplexityModel(nn.Module):
    """Expected complexity E[C] of a structure, as a differentiable function of the attention.

    Each path p from node i into layer j costs ``c_p`` (its MACs over the MACs of
    stem + all blocks). With ``r = 1 - alpha``:

        E[C] = sum_p c_p * (alpha_p - P_in(i) - P_out(j))
        P_in(i)  = prod_{q into i} r_q      (0 for node 0: the stem always runs)
        P_out(j) = prod_{q out of j} r_q    (0 for the last node: the classifier reads it)

    Long skips use their true source node. Computed with two scatter-products over
    all paths at once, so the cost per step does not grow with a Python loop.
    """

    src: torch.Tensor  # buffers: source node, target node and cost c_p of each path
    tgt: torch.Tensor
    cost: torch.Tensor

    def __init__(self, structure: Structure, costs: list[list[float]]):
        super().__init__()
        src, tgt, c = [], [], []
        for l, (spec, layer_costs) in enumerate(zip(structure.layers, costs), 1):
            sources = ([l - 1] if spec.block else []) + list(spec.proxies)
            if len(sources) != len(layer_costs):
                raise ValueError(f"layer {l}: {len(sources)} paths but {len(layer_costs)} costs")
            src += sources
            tgt += [l] * len(sources)
            c += list(layer_costs)
        self.num_nodes = structure.num_layers + 1
        self.register_buffer("src", torch.tensor(src, dtype=torch.long), persistent=False)
        self.register_buffer("tgt", torch.tensor(tgt, dtype=torch.long), persistent=False)
        self.register_buffer("cost", torch.tensor(c, dtype=torch.float32), persistent=False)

    def forward(self, alphas: list[torch.Tensor | None]) -> torch.Tensor:
        alpha = torch.cat([a for a in alphas if a is not None]).float()
        r = 1.0 - alpha
        ones = torch.ones(self.num_nodes, device=alpha.device, dtype=alpha.dtype)
        p_in = ones.scatter_reduce(0, self.tgt, r, reduce="prod")  # product of r over paths into each node
        p_out = ones.scatter_reduce(0, self.src, r, reduce="prod")  # product of r over paths out of each node
        p_in = torch.cat([p_in.new_zeros(1), p_in[1:]])
        p_out = torch.cat([p_out[:-1], p_out.new_zeros(1)])
        return (self.cost * (alpha - p_in[self.src] - p_out[self.tgt])).sum()


class _SquaredError(torch.autograd.Function):
    """``sum((x - t)^2) * scale`` in float32, saving only ``d = x - t``; backward is one pass, ``d * 2 g scale``.

    ``scale`` is ``1 / numel`` (the mean squared error) or, with ``relative``,
    ``2 / (sum(x^2) + sum(t^2))`` taken as a constant (see :func:`relative_se`).
    Autograd's ``sub -> square -> mean`` chain gives the same values but its backward takes about
    three passes over full-size tensors. The sums of squares are dot products: no full-size ``d**2``
    is written. ``t`` gets no gradient and is never saved, so it may be an inference tensor.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, t: torch.Tensor, relative: bool) -> torch.Tensor:
        d = x.float() - t.float()
        flat = d.reshape(-1)
        if relative:
            target, own = t.float().reshape(-1), x.float().reshape(-1)
            scale = 2.0 / (torch.dot(target, target) + torch.dot(own, own)).clamp_min(1e-12)
        else:
            scale = torch.full((), 1.0 / flat.numel(), device=d.device)
        ctx.save_for_backward(d, scale)
        ctx.x_dtype = x.dtype
        return torch.dot(flat, flat) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        d, scale = ctx.saved_tensors
        return (d * (grad * 2.0 * scale)).to(ctx.x_dtype), None, None


def mse(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error (float32) that never saves ``t`` for backward (``t`` may be an inference tensor)."""
    if t.requires_grad:  # not the teacher term's case; keep autograd's general path
        return (x.float() - t.float()).square().mean()
    return _SquaredError.apply(x, t, False)


def relative_se(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``||x - t||^2 / D`` with ``D = (||x||^2 + ||t||^2) / 2`` held constant (no gradient through it).

    Near the target ``D`` is ``||t||^2``, so this is the squared error relative to the teacher's
    energy at that layer (the MSE over the teacher's mean square). It is scale-free: multiplying
    ``x`` and ``t`` by any constant leaves it unchanged, so the teacher weight means the same on
    every backbone family. Taking the student's energy into ``D`` bounds it (at most 4) and bounds
    the gradient relative to the activations, even where the teacher's output is near zero (a
    random-init or dying layer): the plain ``||x - t||^2 / ||t||^2`` diverged there at lr 0.1.
    """
    if t.requires_grad:
        t32, x32 = t.float(), x.float()
        energy = (t32.square().sum() + x32.detach().square().sum()) / 2
        return (x32 - t32).square().sum() / energy.clamp_min(1e-12)
    return _SquaredError.apply(x, t, True)


TEACHER_LOSSES = ("relative", "mse")


def logit_distillation(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s distillation term: ``T^2 * KL(softmax(t / T) || softmax(s / T))``, mean over the batch.

    ``logits`` and ``teacher_logits`` are (B, classes). The ``T^2`` keeps the gradient's size
    independent of ``T``. Computed in float32 from log-probabilities on both sides, so
    ``teacher_logits`` may be an inference tensor (it is never saved for backward).
    """
    student_log_p = F.log_softmax(logits.float() / temperature, dim=1)
    teacher_log_p = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(student_log_p, teacher_log_p, reduction="batchmean", log_target=True)
    return kl * temperature * temperature


def teacher_term(
    logits: torch.Tensor,
    feats: list[torch.Tensor | None],
    teacher_logits: torch.Tensor,
    teacher_feats: list[torch.Tensor],
    *,
    kind: str = "mse",
) -> torch.Tensor:
    """Omega = (D(logits) + sum_l D(x_l, t_l)) / L, skipping layers removed by pruning.

    ``kind="mse"`` (the default) is the paper's D = MSE (mean over elements). Its size follows the
    backbone's activation magnitudes (on an ImageNet EfficientNet-Lite0 it is 99% of the loss).
    ``kind="relative"`` divides each layer's squared error by its energy (:func:`relative_se`), so
    every layer weighs the same on every family and the term is bounded. Measured on that
    EfficientNet-Lite0 (docs/method.md), the plain MSE tailored the better student, so it stays the
    default; ``relative`` is there for backbones whose activations make the MSE unstable.
    """
    if kind not in TEACHER_LOSSES:
        raise ValueError(f"unknown teacher loss {kind!r}; expected one of {TEACHER_LOSSES}")
    dist = relative_se if kind == "relative" else mse
    total = dist(logits, teacher_logits)
    for x, t in zip(feats, teacher_feats):
        if x is not None:
            total = total + dist(x, t)
    return total / len(feats)
