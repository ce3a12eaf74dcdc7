"""Training that diverged with default settings (issue 14.6): gradient clipping keeps the reported
case finite, the relative teacher term is bounded, and a failed stage's advice works as printed."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from datagen import make_imagefolder
from torch import nn
from typer.testing import CliRunner

from tailor_cli.cli import app
from tailor_cli.train import TrainConfig, fit

runner = CliRunner()
# the reported case: 5 classes of 28 px grayscale photos, resnet18 at 32 px after a 1-epoch teacher
ARGS = ["--backbone", "resnet18", "--no-pretrained", "--img-size", "32", "--workers", "0", "--device", "cpu",
        "--epochs", "1", "--teacher-epochs", "1"]


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("gray") / "products", n_classes=5, per_class=90,
                            size=(28, 28), mode="L", seed=3)


def test_default_settings_stay_finite_on_the_reported_case(tmp_path, gray):
    """Issue 14.6: the reported case ended in a non-finite loss (teacher term ~19,000 after one epoch,
    gradient norms in the millions). Clipping each step to a gradient norm of 10 (the default)
    keeps it finite with every other setting default, the paper's MSE teacher term included."""
    res = runner.invoke(app, ["tailor", "--data", str(gray), "--output", str(tmp_path / "default"), *ARGS, "--json"])
    assert res.exit_code == 0, res.output
    (row,) = [json.loads(line) for line in (tmp_path / "default" / "tailor" / "metrics.jsonl").read_text().splitlines()]
    assert row["train_teacher"] < 10 and row["max_grad_norm"] > 10 and row["clipped_steps"] > 0
    assert json.loads((tmp_path / "default" / "tailor" / "config.json").read_text())["settings"]["clip_grad"] == 10.0



@pytest.mark.parametrize("amp", [False, True])  # True: float16 through the gradient scaler (unscaled, then clipped)
@pytest.mark.parametrize("clip", [None, 10.0])
def test_each_step_is_clipped_to_the_gradient_norm(tmp_path, clip, amp):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    images, labels = torch.randn(8, 4), torch.tensor([0, 1] * 4)

    def objective(x, y):  # CE plus a term whose gradient on the bias is (500, 500): norm ~707
        logits = model(x)
        ce = F.cross_entropy(logits.float(), y)
        return ce + 500.0 * model.bias.sum(), logits, {"ce": ce}

    big = 500.0 * 2 ** 0.5

    objective.terms = ("ce",)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(epochs=1, lr=0.1, lr_step=10, momentum=0.0, weight_decay=0.0, clip_grad=clip,
                      amp=amp, amp_dtype="float16")
    row = fit(stage="clip", stage_dir=tmp_path, model=model, objective=objective,
              param_groups=[{"params": list(model.parameters())}], train_loader=[(images, labels)],
              val_loader=[(images, labels)], device=torch.device("cpu"), cfg=cfg)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm().item()
    assert row["max_grad_norm"] == pytest.approx(big, rel=1e-2)  # measured before clipping
    if clip is None:
        assert step == pytest.approx(0.1 * big, rel=1e-2) and row["clipped_steps"] == 0
    else:
        assert step == pytest.approx(0.1 * clip, rel=1e-3) and row["clipped_steps"] == 1


def test_the_relative_teacher_term_is_bounded(tmp_path, gray):
    res = runner.invoke(app, ["tailor", "--data", str(gray), "--output", str(tmp_path / "relative"), *ARGS,
                              "--teacher-loss", "relative", "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "relative" / "tailor" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_teacher"] < 4  # at most 2 per layer averaged... bounded whatever the scale


def test_a_non_finite_loss_says_how_to_rerun_and_that_rerun_works(tmp_path, gray):
    run = tmp_path / "run"
    res = runner.invoke(app, ["teacher", "--data", str(gray), "--output", str(run), *ARGS[:-2], "--epochs", "2",
                              "--lr", "1e6"])
    assert res.exit_code == 6, res.output
    assert "--overwrite" in res.stderr
    advice = res.stderr.strip().splitlines()[-1]
    assert "lower learning rate (--lr;" in advice
    res = runner.invoke(app, ["teacher", "--data", str(gray), "--output", str(run), *ARGS[:-2], "--epochs", "2",
                              "--lr", "0.01", "--overwrite"])
    assert res.exit_code == 0, res.output


def test_attention_logits_are_not_clipped(tmp_path):
    """Clipping the logits together with the proxies' far larger gradients froze the architecture on
    real weights (1 block of 16 left by the attention instead of 8); a "clip": False group is left alone."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    logits = nn.Parameter(torch.zeros(3))
    images, labels = torch.randn(8, 4), torch.tensor([0, 1] * 4)

    def objective(x, y):  # weights' gradient norm ~707 (clipped to 1), the logits' 300 (left alone)
        out = model(x)
        ce = F.cross_entropy(out, y)
        return ce + 500.0 * model.bias.sum() + 100.0 * logits.sum(), out, {"ce": ce}

    objective.terms = ("ce",)
    cfg = TrainConfig(epochs=1, lr=0.1, lr_step=10, momentum=0.0, weight_decay=0.0, clip_grad=1.0)
    row = fit(stage="clip", stage_dir=tmp_path, model=model, objective=objective,
              param_groups=[{"params": list(model.parameters())}, {"params": [logits], "clip": False}],
              train_loader=[(images, labels)], val_loader=[(images, labels)], device=torch.device("cpu"), cfg=cfg)
    assert torch.allclose(logits.detach(), torch.full((3,), -0.1 * 100.0))  # the full step
    assert row["max_grad_norm"] == pytest.approx(500.0 * 2 ** 0.5, rel=1e-2) and row["clipped_steps"] == 1


def test_clip_grad_option(tmp_path, folder_data):
    from conftest import FAST

    run = tmp_path / "off"
    res = runner.invoke(app, ["teacher", "--data", str(folder_data), "--output", str(run), *FAST, "--epochs", "1",
                              "--clip-grad", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "teacher" / "config.json").read_text())["settings"]["clip_grad"] == "off"
    (row,) = [json.loads(line) for line in (run / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert row["clipped_steps"] == 0 and row["max_grad_norm"] > 0
    res = runner.invoke(app, ["teacher", "--data", str(folder_data), "--output", str(tmp_path / "bad"), *FAST,
                              "--clip-grad", "-1"])
    assert res.exit_code == 2 and "--clip-grad must be positive" in res.stderr and "Traceback" not in res.output
    res = runner.invoke(app, ["teacher", "--data", str(folder_data), "--output", str(tmp_path / "bad"), *FAST,
                              "--schedule", "step", "--lr-step", "0"])  # used to mean "the default", silently
    assert res.exit_code == 2 and "--lr-step must be positive, got 0" in res.stderr and not (tmp_path / "bad").exists()
