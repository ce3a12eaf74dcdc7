"""What a training step must not do (issue 5): synchronise with the host, or train frozen weights.

On CUDA a host sync per step (``.item()``, ``bool(tensor)``, ``.tolist()``...) stalls the GPU
queue. These run on the CPU, where a sync is free, so they count the Python-level conversions
that would sync on a GPU instead of timing anything.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from tailor_cli.backbone import describe_chain
from tailor_cli.counting import path_costs
from tailor_cli.losses import ComplexityModel
from tailor_cli.objectives import StudentObjective, TeacherObjective
from tailor_cli.student import Student
from tailor_cli.train import TrainConfig, fit

SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
NUM_CLASSES = 3


class SyncCounter:
    """Counts calls of tensor methods that copy a value to the host, between ``start`` and ``stop``."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self.active = False
        for name in SYNCING:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def wrapper(tensor, *args, **kwargs):
            if self.active:
                self.calls.append(name)
            return original(tensor, *args, **kwargs)
        return wrapper


def _loaders(steps: int, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(steps * batch, 3, 32, 32, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (steps * batch,), generator=g)
    train = DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=False)
    val = DataLoader(TensorDataset(images[:2], labels[:2]), batch_size=2)
    return train, val


def _tailor_setup(kd_weight: float = 0.0):
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=NUM_CLASSES)
    teacher = copy.deepcopy(backbone).eval().requires_grad_(False)
    student = Student(backbone, NUM_CLASSES)
    costs, _ = path_costs(student, 32)
    objective = StudentObjective(student, teacher, describe_chain(teacher),
                                 ComplexityModel(student.structure, costs), 0.3, 10.0, kd_weight=kd_weight)
    return student, teacher, objective, [{"params": student.trainable_parameters()}]


def _tailor_kd_setup():
    return _tailor_setup(kd_weight=1.0)


def _full_setup():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=NUM_CLASSES)
    return model, None, TeacherObjective(model), [{"params": list(model.parameters())}]


class _StepWindow:
    """Callbacks that switch the counter on for the step loop only (first step to last step)."""

    def __init__(self, counter: SyncCounter):
        self.counter = counter

    def on_stage_start(self, *a):
        self.counter.active = True

    def on_step(self, stage, epoch, step, steps):
        if step + 1 == steps:  # the epoch's evaluation and checkpoint may sync
            self.counter.active = False

    def on_epoch_end(self, *a):
        pass

    def on_message(self, *a):
        pass


@pytest.mark.parametrize("setup", [_tailor_setup, _tailor_kd_setup, _full_setup], ids=["tailor", "tailor-kd", "finetune"])
def test_training_steps_never_sync_with_the_host(tmp_path, monkeypatch, setup):
    """Steps between finiteness checks copy nothing to the host: the count does not grow with steps."""
    counts = {}
    for steps in (2, 6):
        model, teacher, objective, groups = setup()
        counter = SyncCounter(monkeypatch)
        train, val = _loaders(steps)
        cfg = TrainConfig(epochs=1, lr=0.01, lr_step=1, check_every=10**6)  # a CUDA run checks every 50
        fit(stage="s", stage_dir=tmp_path / f"{steps}", model=model, objective=objective, param_groups=groups,
            train_loader=train, val_loader=val, device=torch.device("cpu"), cfg=cfg,
            callbacks=_StepWindow(counter),
            train_mode=(lambda m=model, t=teacher: (m.train(), t.eval() if t is not None else None)))
        counts[steps] = list(counter.calls)
    assert counts[2] == counts[6], counts
    # the one check at the end of the epoch is the only conversion in the step loop
    assert len(counts[6]) <= 2, counts[6]


def test_tailor_step_trains_only_proxies_attention_and_classifier():
    """After a step, frozen weights have no gradient and the teacher's outputs carry no graph."""
    student, teacher, objective, _ = _tailor_setup()
    student.train()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    loss, _, terms = objective(images, labels)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in student.frozen_parameters())
    assert all(p.grad is None for p in teacher.parameters())
    trained = {id(p) for p in student.trainable_parameters()}
    assert all(p.grad is not None for p in student.parameters() if id(p) in trained and p.requires_grad)
    assert terms["teacher"].requires_grad  # the student side of Omega is differentiable
