"""torchrun: two gloo processes on CPU train like one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datagen import make_imagefolder, randomise_bn_stats
from safetensors.torch import load_file

ARGS = ["--backbone", "test_resnet", "--no-pretrained", "--img-size", "64", "--workers", "0", "--device", "cpu",
        "--epochs", "1", "--no-augment", "--lr", "0.05"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    return env


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    # 16 training images: one epoch is a single step of the global batch of 16, so the comparison
    # is not blurred by the chaotic amplification of rounding differences over many BN steps
    data = make_imagefolder(tmp_path / "data", n_classes=2, per_class=8, size=(64, 64))
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run([*torchrun, "-m", "tailor_cli", "teacher", "--data", str(data), *ARGS, "--batch-size", "8",
                           "--output", str(two), "--json"], capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    json.loads(proc.stdout)  # rank 0 alone printed: exactly one JSON document
    assert proc.stderr.count("teacher epoch 1/1: loss") == 1  # and one log line per epoch
    assert "effective batch 16" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tailor_cli", "teacher", "--data", str(data), *ARGS,
                           "--batch-size", "16", "--output", str(one)], capture_output=True, text=True, env=_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # rank 0 alone wrote the run directory: the same files as a single process, no leftovers
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert files(two) == files(one)
    assert len((two / "teacher" / "metrics.jsonl").read_text().splitlines()) == 1

    a = load_file(str(two / "teacher" / "model.safetensors"))
    b = load_file(str(one / "teacher" / "model.safetensors"))
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tailor_cli.stages import BackboneOptions
    from tailor_cli.stages.common import build_backbone

    init = build_backbone(BackboneOptions("test_resnet", False, None), 2, 0).state_dict()
    params = [k for k in a if a[k].is_floating_point() and "running" not in k]
    moved = max((b[k] - init[k]).abs().max().item() for k in params)
    diff = max((a[k] - b[k]).abs().max().item() for k in params)
    assert moved > 1e-2  # training really changed the weights
    assert diff < 1e-4 * moved + 1e-6, (diff, moved)  # and both runs changed them the same way
    # validation accuracy is reduced exactly over the whole split, not averaged per rank
    ra = json.loads((two / "teacher" / "metrics.jsonl").read_text())
    rb = json.loads((one / "teacher" / "metrics.jsonl").read_text())
    assert ra["val_acc"] == rb["val_acc"]


# --------------------------------------------------------------------------- BatchNorm conversion


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # the CUDA converter runs on CPU tensors in eval mode
@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet"])
def test_sync_batchnorm_keeps_every_activation_and_syncs_every_batchnorm(monkeypatch, name, device):
    import copy

    import timm
    import torch
    from timm.layers import BatchNormAct2d

    from tailor_cli import distributed

    monkeypatch.setattr(distributed, "_INFO", distributed.DistInfo(rank=0, world_size=2))  # a stand-in torchrun
    model = randomise_bn_stats(timm.create_model(name, pretrained=False, num_classes=3)).eval()
    converted = distributed.sync_batchnorm(copy.deepcopy(model), torch.device(device)).eval()
    assert converted.state_dict().keys() == model.state_dict().keys()
    norms = [m for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    synced = (torch.nn.SyncBatchNorm,) if device == "cuda" else (distributed._AllReduceBatchNorm,)
    assert norms and all(isinstance(m, synced) for m in norms)  # no BatchNorm keeps per-rank statistics
    if any(isinstance(m, BatchNormAct2d) for m in model.modules()):
        assert any(not isinstance(getattr(m, "act", torch.nn.Identity()), torch.nn.Identity) for m in norms)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(converted(x), model(x), atol=1e-6, rtol=1e-5)


def _bn_stats(z):
    """What the all-reduce BatchNorm sums per rank: per-channel sum, sum of squares, and the count."""
    import torch

    z = z.double()
    return torch.cat([z.sum((0, 2, 3)), z.square().sum((0, 2, 3)), torch.tensor([z.numel() / z.size(1)]).double()])


def test_scaled_proxy_normalises_with_the_global_batch(monkeypatch):
    """A proxy's attention-scaled BN goes through the all-reduce: scale * BN over both ranks' batches."""
    import copy

    import torch

    from tailor_cli import distributed
    from tailor_cli.proxies import Proxy

    torch.manual_seed(0)
    proxy = distributed.convert_batchnorm(Proxy(8, 6), torch.device("cpu")).train()
    bn = proxy.body[-1]
    assert isinstance(bn, distributed._AllReduceBatchNorm)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x, other = torch.randn(4, 8, 5, 5), torch.randn(3, 8, 5, 5) * 2 + 1  # this rank's batch, the other rank's
    with torch.no_grad():
        z, z_other = proxy.body[0](x), proxy.body[0](other)
    calls = []

    def all_reduce(t, op=None):  # rank 0 of 2: the sum adds what the other rank holds
        calls.append(t.numel())
        t.add_(_bn_stats(z_other).to(t.dtype))

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    reference = copy.deepcopy(bn)
    scale = torch.tensor(0.3)
    out = proxy(x, scale)
    assert calls == [2 * 6 + 1]  # the statistics went through the all-reduce
    both = torch.cat([z, z_other])
    mean, var = both.mean((0, 2, 3), keepdim=True), both.var((0, 2, 3), unbiased=False, keepdim=True)
    want = scale * ((z - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
    assert torch.allclose(out, want, atol=1e-5)
    want_module = scale * reference(z)  # the module's own forward, same all-reduce
    assert torch.allclose(out, want_module, atol=1e-6)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(bn, name).double(), getattr(reference, name).double(), atol=1e-7), name


def test_scaled_proxy_runs_through_torchs_sync_batchnorm(monkeypatch):
    """On CUDA the proxy's BN is torch's SyncBatchNorm: the scaled path must call it (its forward syncs)."""
    import copy

    import torch

    from tailor_cli import distributed
    from tailor_cli.proxies import Proxy, ProxyForm

    torch.manual_seed(0)
    proxy = distributed.convert_batchnorm(Proxy(8, 6, ProxyForm("lowrank", width=16)), torch.device("cuda")).train()
    assert all(isinstance(m, torch.nn.SyncBatchNorm) for m in proxy.body if isinstance(m, torch.nn.BatchNorm2d))
    bn = proxy.body[-1]
    reference = copy.deepcopy(bn)
    calls = []
    forward = torch.nn.SyncBatchNorm.forward
    monkeypatch.setattr(torch.nn.SyncBatchNorm, "forward", lambda self, x: calls.append(self) or forward(self, x))
    x = torch.randn(4, 8, 5, 5)
    scale = torch.tensor(0.7, requires_grad=True)
    out = proxy(x, scale)
    assert any(m is bn for m in calls)  # no process group here: SyncBatchNorm falls back to local statistics
    with torch.no_grad():
        z = proxy.body[:-1](x)
    assert torch.allclose(out, scale.detach() * reference(z), atol=1e-6)
    assert torch.equal(bn.running_mean, reference.running_mean) and torch.equal(bn.running_var, reference.running_var)
    out.sum().backward()
    assert scale.grad is not None and bn.weight.grad is not None


def test_all_reduce_batchnorm_act_trains_like_timms_in_one_process(monkeypatch):
    """In training mode too: the all-reduce copy of a BatchNormAct2d normalises, drops and activates alike."""
    import copy

    import torch
    from timm.layers import BatchNormAct2d

    from tailor_cli import distributed

    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, op=None: t)  # a world of one
    torch.manual_seed(0)
    original = BatchNormAct2d(5, act_layer=torch.nn.SiLU).train()
    converted = distributed.convert_batchnorm(torch.nn.Sequential(copy.deepcopy(original)), torch.device("cpu"))[0]
    assert isinstance(converted, distributed._AllReduceBatchNormAct)
    x = torch.randn(3, 5, 4, 4) * 3 + 1
    assert torch.allclose(converted(x), original(x), atol=1e-5)
    assert torch.allclose(converted.running_var, original.running_var, atol=1e-6)
    assert torch.allclose(converted.running_mean, original.running_mean, atol=1e-6)
