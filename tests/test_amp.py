"""float16 mixed precision trains through a gradient scaler, saved with the checkpoint."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tailor_cli.checkpoint import read_safetensors
from tailor_cli.runs import CHECKPOINT
from tailor_cli.train import TrainConfig, fit

STEPS = 4  # per epoch
INIT_SCALE = 65536.0  # torch.amp.GradScaler's default


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(12, 2)
        self.w = nn.Parameter(torch.full((1,), 1e-36))

    def forward(self, x):
        return self.fc(x.flatten(1))


class _Objective:
    """CE, plus ``w * big`` when ``big``: a finite loss term (100) whose gradient (1e38) times the scale is inf."""

    terms = ("ce",)

    def __init__(self, model: _Tiny, big: float):
        self.model, self.big = model, big

    def __call__(self, images, labels):
        logits = self.model(images)
        ce = F.cross_entropy(logits.float(), labels)
        return ce + (self.model.w * self.big).sum(), logits, {"ce": ce}


def _fit(tmp_path, model, big, *, epochs=1, resume=False, amp_dtype="float16"):
    torch.manual_seed(1)
    batches = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 0, 1])) for _ in range(STEPS)]
    cfg = TrainConfig(epochs=epochs, lr=0.1, lr_step=10, amp=True, amp_dtype=amp_dtype)
    return fit(stage="amp", stage_dir=tmp_path / "amp", model=model, objective=_Objective(model, big),
               param_groups=[{"params": list(model.parameters())}], train_loader=batches, val_loader=batches[:1],
               device=torch.device("cpu"), cfg=cfg, resume=resume)


def _scaler_meta(tmp_path) -> dict | None:
    return read_safetensors(tmp_path / "amp" / CHECKPOINT, what="checkpoint")[1].get("grad_scaler")


def test_float16_steps_go_through_the_grad_scaler(tmp_path):
    model = _Tiny()
    before = [p.detach().clone() for p in model.parameters()]
    _fit(tmp_path, model, big=0.0)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained
    meta = _scaler_meta(tmp_path)
    assert meta is not None and meta["scale"] == INIT_SCALE and meta["_growth_tracker"] == STEPS


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_an_overflowing_gradient_skips_the_step_and_resume_keeps_the_lowered_scale(tmp_path):
    model = _Tiny()
    before = [p.detach().clone() for p in model.parameters()]
    row = _fit(tmp_path, model, big=1e38)  # a finite loss: no "non-finite loss" error
    assert row["epoch"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # every step was skipped
    assert _scaler_meta(tmp_path)["scale"] == INIT_SCALE * 0.5 ** STEPS
    _fit(tmp_path, _Tiny(), big=1e38, epochs=2, resume=True)
    assert _scaler_meta(tmp_path)["scale"] == INIT_SCALE * 0.5 ** (2 * STEPS)  # continued, not restarted


def test_bfloat16_has_no_grad_scaler(tmp_path):
    _fit(tmp_path, _Tiny(), big=0.0, amp_dtype="bfloat16")
    assert _scaler_meta(tmp_path) is None
