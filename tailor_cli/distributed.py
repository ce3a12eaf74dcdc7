"""torchrun support: process group from the environment, rank-0-only side effects, exact reductions.

Under ``torchrun --nproc-per-node N -m tailor_cli ...`` the usual variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) are set; :func:`setup` starts the
process group (NCCL on CUDA, gloo on CPU). Without them everything here is a no-op
and the tool runs as a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO = DistInfo()


def setup() -> DistInfo:
    """Start the process group when launched by torchrun with more than one process."""
    global _INFO
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return _INFO
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and os.environ.get("NETTAILOR_DIST_BACKEND", "") != "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    _INFO = DistInfo(rank, world, local)
    return _INFO


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def info() -> DistInfo:
    return _INFO


def is_main() -> bool:
    return _INFO.is_main


def barrier() -> None:
    if _INFO.enabled:
        dist.barrier()


def decided(check: Callable[[], bool]) -> bool:
    """``check()`` as every rank sees it before any of them acts on the answer (for a branch that writes: rank 0
    alone writes, and every rank must take the same branch). Plain ``check()`` in a single process."""
    barrier()
    answer = check()
    barrier()
    return answer


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place); identity in a single process."""
    if _INFO.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(model: nn.Module) -> None:
    """Make every rank hold rank 0's buffers (BN statistics) before evaluating or saving."""
    if _INFO.enabled:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the trainable parameters only (frozen ones are not synchronised)."""
    if not _INFO.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else _INFO.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def train_sampler(dataset, seed: int):
    """The same shuffled order for 1 or N processes: rank r takes every N-th index of one permutation."""
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(dataset, num_replicas=_INFO.world_size, rank=_INFO.rank, shuffle=True, seed=seed,
                              drop_last=True)


def eval_shard(dataset):
    """Rank r evaluates items r, r+N, ...: no padding, so summed counts give the exact accuracy."""
    if not _INFO.enabled:
        return dataset
    return torch.utils.data.Subset(dataset, list(range(_INFO.rank, len(dataset), _INFO.world_size)))


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class _AllReduceBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are computed over the whole global batch.

    torch's SyncBatchNorm runs on GPUs only; this one all-reduces per-channel sums with a
    differentiable all-reduce, so it also works with gloo on CPU. Eval mode is plain BN.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        count = torch.tensor([x.numel() / x.size(1)], device=x.device, dtype=torch.float32)
        xd = x.double()  # float64 sums: E[x^2] - E[x]^2 cancels badly in float32
        stats = torch.cat([xd.sum((0, 2, 3)), xd.square().sum((0, 2, 3)), count.double()])
        stats = _AllReduceSum.apply(stats)
        c = x.size(1)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean.square()).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                tracked = self.num_batches_tracked
                assert tracked is not None  # track_running_stats keeps it
                tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)).clamp(max=1e9), alpha=m)
        shape = (1, c, 1, 1)
        y = (x - mean.view(shape).to(x.dtype)) * torch.rsqrt(var.view(shape) + self.eps).to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class _AllReduceBatchNormAct(_AllReduceBatchNorm):
    """timm's ``BatchNormAct2d`` with global-batch statistics: the same ``drop`` and ``act`` after the norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


M = TypeVar("M", bound=nn.Module)


def sync_batchnorm(model: M, device: torch.device) -> M:
    """Under torchrun, make every BatchNorm's statistics cover the global batch (see :func:`convert_batchnorm`).

    The BatchNorms below ``model`` are replaced in place, so ``model`` itself comes back.
    """
    if not _INFO.enabled:
        return model
    return cast(M, convert_batchnorm(model, device))


def convert_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d (timm's BatchNormAct2d included) by one with global-batch statistics.

    CUDA: timm's converter (torch's SyncBatchNorm, and timm's SyncBatchNormAct keeping a
    BatchNormAct2d's drop and activation; torch's own converter would drop them). Other
    devices: :class:`_AllReduceBatchNorm` / :class:`_AllReduceBatchNormAct` (gloo works).
    Parameters, buffers and submodules are kept (the same tensors), so state-dict keys do not
    change; eval-mode outputs do not change either. Needs no process group to convert.
    """
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)
    from timm.layers import BatchNormAct2d

    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d) and type(child) in (nn.BatchNorm2d, BatchNormAct2d):
            setattr(model, name, _all_reduce_copy(child))
        else:
            convert_batchnorm(child, device)
    return model


def _all_reduce_copy(bn: nn.BatchNorm2d) -> _AllReduceBatchNorm:
    """An all-reduce BatchNorm holding ``bn``'s own parameters, buffers and (BatchNormAct2d) drop/act."""
    with_act = hasattr(bn, "act")
    cls = _AllReduceBatchNormAct if with_act else _AllReduceBatchNorm
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
    if with_act:
        new.drop, new.act = bn.drop, bn.act
    new.train(bn.training)
    return new
