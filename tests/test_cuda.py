"""The CUDA paths: bf16 autocast, channels-last, no host sync in a step, exports on the GPU.

Skipped without a GPU (CI has none). On a GPU machine: ``python -m pytest -q tests/test_cuda.py``.
"""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from conftest import FAST
from typer.testing import CliRunner

from tailor_cli.backbone import describe_chain
from tailor_cli.cli import app
from tailor_cli.counting import path_costs
from tailor_cli.losses import ComplexityModel
from tailor_cli.objectives import StudentObjective
from tailor_cli.stages import TrainOptions
from tailor_cli.student import LayerSpec, Structure, Student
from tailor_cli.train import TrainConfig, make_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
GPU_FAST = [a if a != "cpu" else "cuda" for a in FAST]


def test_cuda_defaults_are_bf16_autocast_and_channels_last():
    cfg = TrainOptions().config(CUDA)
    assert cfg.amp and cfg.amp_dtype == "bfloat16" and cfg.channels_last and cfg.check_every > 1
    cpu = TrainOptions().config(torch.device("cpu"))
    assert not cpu.amp and not cpu.channels_last and cpu.check_every == 1


def test_blocks_only_student_reproduces_the_backbone_on_cuda():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    n = len(describe_chain(model).blocks)
    student = Student(copy.deepcopy(model), 4, structure=Structure([LayerSpec(True, []) for _ in range(n)]))
    model, student = model.to(CUDA), student.to(CUDA).eval()
    x = torch.randn(2, 3, 64, 64, device=CUDA)
    torch.backends.cudnn.deterministic = True
    try:
        with torch.inference_mode():
            chain = describe_chain(model)
            h = chain.stem(x)
            for block in chain.blocks:
                h = block(h)
            _, feats = student(x, return_features=True)
    finally:
        torch.backends.cudnn.deterministic = False
    torch.testing.assert_close(feats[-1], h, rtol=1e-5, atol=1e-5)


def test_tailor_step_never_synchronises_with_the_host():
    """bf16 autocast, channels-last, the step and the on-device metric sums as ``train.fit`` runs them."""
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=5)
    teacher = copy.deepcopy(backbone).to(CUDA, memory_format=torch.channels_last).eval().requires_grad_(False)
    student = Student(backbone, 5)
    costs, _ = path_costs(student, 64)
    student = student.to(CUDA, memory_format=torch.channels_last).train()
    objective = StudentObjective(student, teacher, describe_chain(teacher),
                                 ComplexityModel(student.structure, costs).to(CUDA), 0.3, 10.0)
    opt, _ = make_optimizer([{"params": student.trainable_parameters()}], TrainConfig(epochs=1, lr=0.1, lr_step=1))
    images = torch.randn(8, 3, 64, 64, device=CUDA).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 5, (8,), device=CUDA)
    sums = torch.zeros(len(objective.terms) + 2, device=CUDA)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, logits, terms = objective(images, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            values = torch.stack([terms[t].detach().float() for t in objective.terms] + [loss.detach().float()])
            sums[:-1] += values * labels.numel()
            sums[-1] += (logits.detach().argmax(1) == labels).sum()
        return logits

    step()  # warm-up: cuDNN autotuning and lazy initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            logits = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(sums).all()
    assert all(p.grad is None for p in student.frozen_parameters())


def test_run_on_cuda_then_export_reproduces_the_students_logits(tmp_path, folder_data):
    from tailor_cli.adapter import load_export
    from tailor_cli.loading import load_student

    run, out = tmp_path / "run", tmp_path / "export"
    args = [a for i, a in enumerate(GPU_FAST) if "--batch-size" not in GPU_FAST[max(i - 1, 0):i + 1]]
    res = CliRunner().invoke(app, ["run", "--data", str(folder_data), "--output", str(run), "--export-dir", str(out),
                                   "--epochs", "1", "--drop-blocks", "1", "--threshold", "0.01", *args, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tasks"][0]["totals"]["blocks_kept"] == 3
    config = json.loads((run / "finetune" / "config.json").read_text())
    assert config["resolved"]["amp"] is True and config["resolved"]["channels_last"] is True

    student, _ = load_student(run / "finetune", CUDA)
    _, tasks = load_export(out, device=CUDA)
    (served, _), = tasks.values()
    x = torch.randn(4, 3, 32, 32, device=CUDA)
    with torch.inference_mode():
        torch.testing.assert_close(served.eval()(x), student.eval()(x), rtol=1e-4, atol=1e-4)
