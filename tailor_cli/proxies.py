"""Proxies: the cheap trainable paths that skip over frozen blocks (docs/method.md, "Proxies").

A proxy reads a node already max-pooled to its layer's resolution and maps it with 1x1
convolutions and a BatchNorm; its form (dense, low-rank or grouped) is the most expressive one
that costs at most 1/PROXY_BUDGET of the block it stands in for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PROXY_BUDGET = 12  # a proxy costs at most 1/PROXY_BUDGET of the block it stands in for (where it can)


MIN_PROXY_WIDTH = 8


def init_new(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.01)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@dataclass(frozen=True)
class ProxyForm:
    """The shape of one proxy (docs/method.md, "Proxies"); all are 1x1 convolutions, no activation at the end.

    ``"dense"``: 1x1 conv + BN, the paper's proxy. ``"lowrank"``: 1x1 conv to ``width`` + BN + ReLU +
    1x1 conv + BN. ``"grouped"``: 1x1 conv in ``groups`` groups + BN.
    """

    kind: str
    width: int = 0
    groups: int = 1

    def macs_per_pixel(self, in_chs: int, out_chs: int) -> int:
        if self.kind == "lowrank":
            return self.width * (in_chs + out_chs)
        return in_chs * out_chs // self.groups

    def describe(self) -> str:
        return {"dense": "1x1", "lowrank": f"1x1>{self.width}>1x1", "grouped": f"1x1/{self.groups}g"}[self.kind]


def proxy_form(in_chs: int, out_chs: int, block_macs_per_pixel: float, budget: int = PROXY_BUDGET) -> ProxyForm:
    """The most expressive proxy costing at most ``block_macs_per_pixel / budget`` per output pixel.

    In order: the dense 1x1 (ResNet BasicBlocks, ConvNeXt blocks, most inverted residuals); a
    low-rank pair of 1x1s, its width the largest multiple of 8 that fits (ResNet Bottlenecks,
    RegNet's grouped blocks, 1x1 conv blocks, ConvNeXt's downsamples); for blocks too cheap for
    a rank of 8 (the thin depthwise-separable first blocks of EfficientNet and MobileNetV3) a
    grouped 1x1 with the fewest groups that fits, or as many as the channels allow.
    """
    limit = block_macs_per_pixel / budget
    if in_chs * out_chs <= limit:
        return ProxyForm("dense")
    width = int(limit // (in_chs + out_chs)) // 8 * 8
    if width >= MIN_PROXY_WIDTH:
        return ProxyForm("lowrank", width=width)
    common = math.gcd(in_chs, out_chs)
    divisors = [g for g in range(1, common + 1) if common % g == 0]
    groups = next((g for g in divisors if in_chs * out_chs / g <= limit), common)
    return ProxyForm("grouped", groups=groups) if groups > 1 else ProxyForm("dense")


class Proxy(nn.Module):
    """A cheap path into a layer, of the given :class:`ProxyForm`. Input: the source node, already
    pooled to the target size. (B, in_chs, H, W) -> (B, out_chs, H, W). No activation at the end:
    the layer applies it.
    """

    def __init__(self, in_chs: int, out_chs: int, form: ProxyForm = ProxyForm("dense")):
        super().__init__()
        self.form = form
        if form.kind == "lowrank":
            self.body = nn.Sequential(
                nn.Conv2d(in_chs, form.width, 1, bias=False), nn.BatchNorm2d(form.width), nn.ReLU(inplace=True),
                nn.Conv2d(form.width, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs),
            )
        else:
            self.body = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, groups=form.groups, bias=False),
                                      nn.BatchNorm2d(out_chs))
        init_new(self)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``scale`` (a 0-dim attention weight) multiplies the output, folded into the last BN's affine.

        ``scale * BN(z)`` equals BN(z) with weight and bias times ``scale``: folding saves a pass over
        the output forward, and backward a pass plus a full-size saved tensor (the plain product
        would keep ``BN(z)`` alive for the gradient of ``scale``).
        """
        if scale is None:
            return self.body(x)
        *head, bn = self.body
        for m in head:
            x = m(x)
        return _scaled_batch_norm(bn, x, scale)


def _scaled_batch_norm(bn: nn.Module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale * bn(x)`` in one BatchNorm call (same running-statistics bookkeeping as ``bn(x)``).

    A plain ``nn.BatchNorm2d`` is computed here with ``F.batch_norm``. Any other BatchNorm
    (torchrun's SyncBatchNorm or all-reduce BN, see :func:`tailor_cli.distributed.convert_batchnorm`)
    runs its own forward, whose statistics cover the global batch, with the scale folded into
    the weight and bias it reads.
    """
    if type(bn) is not nn.BatchNorm2d:
        if bn.weight is None:
            return bn(x) * scale
        folded = {"weight": bn.weight * scale} | ({"bias": bn.bias * scale} if bn.bias is not None else {})
        return torch.func.functional_call(bn, folded, (x,))
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    weight = bn.weight * scale if bn.weight is not None else scale.expand(x.shape[1])
    bias = bn.bias * scale if bn.bias is not None else None
    return F.batch_norm(x, bn.running_mean if track else None, bn.running_var if track else None,
                        weight, bias, use_batch_stats, momentum, bn.eps)
