"""Max-pooling that brings a node to a later layer's resolution, and faster CPU kernels for it.

PyTorch's CPU max-pool kernel for NCHW tensors is scalar; :func:`_pool` computes the same values
(and gradients) through the vectorised channels-last kernel, or without a gradient as a separable
max over strided views. Used by the student's proxies and by the stems the student and teacher run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that computes its values faster when no gradient flows (see :func:`_pool`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pool(self, x)


def make_pool(stride: int, mode: str = "ceil") -> nn.Module:
    """Max-pool by ``stride`` to the size the blocks produce.

    ``"ceil"`` (padded 3x3 stride-2 convs: ResNet, EfficientNet, RegNet): kernel s+1, padding
    s//2, output ceil(H/s). ``"floor"`` (2x2 stride-2 convs: ConvNeXt): kernel s, output floor(H/s).
    """
    if stride == 1:
        return nn.Identity()
    if mode == "floor":
        return MaxPool2d(kernel_size=stride, stride=stride, padding=0)
    return MaxPool2d(kernel_size=stride + 1, stride=stride, padding=stride // 2)


def fast_stem(stem: nn.Sequential) -> nn.Sequential:
    """The student's own copy of the stem, its plain max-pools swapped for :class:`MaxPool2d`."""
    for name, m in stem.named_children():
        if type(m) is nn.MaxPool2d:
            fast = MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.return_indices, m.ceil_mode)
            setattr(stem, name, fast)
    return stem


def run_stem(stem: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``stem(x)`` for a stem we must not modify (the teacher's), max-pools as in :func:`_pool`."""
    if not isinstance(stem, nn.Sequential):
        return stem(x)
    for m in stem:
        x = _pool(m, x) if type(m) is nn.MaxPool2d else m(x)
    return x


def _pool(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``pool(x)``, faster for a large NCHW tensor on the CPU; the values (and gradients) are identical.

    PyTorch's CPU max-pool kernel for NCHW tensors is scalar (it was the student's costliest
    elementwise op in the profile); the channels-last kernel is vectorised over channels. With a
    gradient, pool a channels-last copy (same argmax rule, so the same gradient on ties) and
    convert back; without one (stems, inference), a separable max over strided views needs
    no indices at all.
    """
    if not isinstance(pool, nn.MaxPool2d):
        return pool(x)
    if (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.numel() >= _FAST_POOL_MIN_NUMEL
        and x.is_contiguous()
        and not x.is_contiguous(memory_format=torch.channels_last)
        and not pool.ceil_mode
        and not pool.return_indices
        and _pair(pool.dilation) == (1, 1)
    ):
        if not (x.requires_grad and torch.is_grad_enabled()):
            return _max_pool_nograd(x, _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding))
        return nn.MaxPool2d.forward(pool, x.contiguous(memory_format=torch.channels_last)).contiguous()
    return nn.MaxPool2d.forward(pool, x)


_FAST_POOL_MIN_NUMEL = 32768  # below this the plain kernel's single call is as fast


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _max_pool_nograd(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """``F.max_pool2d(x, kernel, stride, padding)`` (floor mode) as a max over rows, then columns."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    H, W = x.shape[-2:]
    ho, wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    if kh < 2 or kw < 2 or ho < 1 or wo < 1 or 2 * ph > kh or 2 * pw > kw:
        return F.max_pool2d(x, kernel, stride, padding)
    xp = F.pad(x, (pw, pw, ph, ph), value=float("-inf")) if ph or pw else x
    rows = [xp[..., i:i + sh * (ho - 1) + 1:sh, :] for i in range(kh)]
    v = torch.maximum(rows[0], rows[1])
    for r in rows[2:]:
        torch.maximum(v, r, out=v)
    cols = [v[..., j:j + sw * (wo - 1) + 1:sw] for j in range(kw)]
    out = torch.maximum(cols[0], cols[1])
    for c in cols[2:]:
        torch.maximum(out, c, out=out)
    return out
