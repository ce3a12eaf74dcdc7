"""torchrun: two gloo processes on CPU train like one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from datagen import make_imagefolder

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
    assert proc.stderr.count("teacher epoch 1:") == 1  # and one log line per epoch
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
    from tailor_cli.pipeline import BackboneOptions, _build_backbone

    init = _build_backbone(BackboneOptions("test_resnet", False, None), 2, 0).state_dict()
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
def _randomised_stats(model):
    """Non-trivial BN statistics, so a conversion that re-initialised them would show."""
    import torch

    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # the CUDA converter runs on CPU tensors in eval mode
@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet"])
def test_sync_batchnorm_keeps_every_activation_and_syncs_every_batchnorm(monkeypatch, name, device):
    import copy

    import timm
    import torch
    from timm.layers import BatchNormAct2d

    from tailor_cli import distributed

    monkeypatch.setattr(distributed, "_INFO", distributed.DistInfo(rank=0, world_size=2))  # a stand-in torchrun
    model = _randomised_stats(timm.create_model(name, pretrained=False, num_classes=3)).eval()
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
