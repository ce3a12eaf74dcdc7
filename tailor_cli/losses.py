"""The three terms of the NetTailor loss: L = CE + g1 * E[C] + g2 * Omega (METHOD.md, "Loss")."""
from __future__ import annotations

import torch
from torch import nn

from .student import Structure


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


class _MeanSquaredError(torch.autograd.Function):
    """mean((x - t)^2) in float32, saving only ``d = x - t``; backward is one pass, ``d * (2 g / n)``.

    Autograd's ``sub -> square -> mean`` chain gives the same values but its backward takes
    about three passes over full-size tensors (mean's expand, pow's ``2 * d * g``). The forward's
    sum of squares is a dot product: no full-size ``d**2`` is written. ``t`` gets no gradient and
    is never saved, so it may be an inference tensor.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        d = x.float() - t.float()
        ctx.save_for_backward(d)
        ctx.x_dtype = x.dtype
        flat = d.reshape(-1)
        return torch.dot(flat, flat) / flat.numel()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (d,) = ctx.saved_tensors
        return (d * (grad * (2.0 / d.numel()))).to(ctx.x_dtype), None


def mse(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error (float32) that never saves ``t`` for backward (``t`` may be an inference tensor)."""
    if t.requires_grad:  # not the teacher term's case; keep autograd's general path
        return (x.float() - t.float()).square().mean()
    return _MeanSquaredError.apply(x, t)


def teacher_term(
    logits: torch.Tensor,
    feats: list[torch.Tensor | None],
    teacher_logits: torch.Tensor,
    teacher_feats: list[torch.Tensor],
) -> torch.Tensor:
    """Omega = (MSE(logits) + sum_l MSE(x_l, t_l)) / L, skipping layers removed by pruning."""
    total = mse(logits, teacher_logits)
    for x, t in zip(feats, teacher_feats):
        if x is not None:
            total = total + mse(x, t)
    return total / len(feats)
