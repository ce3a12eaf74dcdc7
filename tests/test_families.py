"""Beyond ResNet: EfficientNet, MobileNetV3, RegNet and ConvNeXt as chains of universal blocks."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from datagen import make_imagefolder
from tailor_cli.adapter import load_task
from tailor_cli.backbone import describe_chain
from tailor_cli.cli import app
from tailor_cli.pipeline import load_student
from tailor_cli.student import LayerSpec, Structure, Student

FAMILIES = [
    ("test_resnet", "resnet"),
    ("test_efficientnet", "efficientnet"),
    ("mobilenetv3_small_050", "mobilenetv3"),
    ("regnetx_002", "regnet"),
    ("regnety_002", "regnet"),
    ("test_convnext", "convnext"),
]


@pytest.mark.parametrize("name,family", FAMILIES)
@pytest.mark.parametrize("size", [(64, 64), (45, 53)])
def test_blocks_only_student_reproduces_the_backbone(name, family, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    for m in model.modules():  # non-trivial statistics, so dropped or re-initialised ones would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    chain = describe_chain(model)
    assert chain.family == family and len(chain.blocks) >= 4
    n = len(chain.blocks)
    student = Student(model, 5, structure=Structure([LayerSpec(True, []) for _ in range(n)])).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        h = chain.stem(x)
        expected = []
        for block in chain.blocks:
            h = block(h)
            expected.append(h)
        pre_logits = model.forward_head(chain.tail(h), pre_logits=True)
        logits, feats = student(x, return_features=True)
    for got, want in zip(feats, expected):
        assert torch.equal(got, want)
    assert torch.allclose(logits, student.fc(pre_logits), atol=1e-6)


@pytest.mark.parametrize("name,family", FAMILIES[1:])
def test_full_student_runs_at_odd_sizes_and_trains_only_task_tensors(name, family):
    model = timm.create_model(name, pretrained=False, num_classes=0)
    student = Student(model, 3)
    assert sum(len(l.sources) for l in student.layers) > 0
    loss = student(torch.randn(2, 3, 47, 39)).sum()
    loss.backward()
    assert all(p.grad is None for p in student.frozen_parameters())
    assert all(p.grad is not None for p in student.trainable_parameters() if p.requires_grad)


@pytest.mark.parametrize("name", [n for n, _ in FAMILIES[1:]])
def test_round_trip_per_family(tmp_path_factory, name):
    root = tmp_path_factory.mktemp(name)
    data = make_imagefolder(root / "data", n_classes=3, per_class=8, size=(40, 40))
    run, export = root / "run", root / "export"
    res = CliRunner().invoke(app, ["run", "--data", str(data), "--backbone", name, "--no-pretrained", "--img-size", "48",
                                   "--epochs", "1", "--drop-blocks", "1", "--threshold", "0.0", "--workers", "0",
                                   "--device", "cpu", "--output", str(run), "--out", str(export), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)["tasks"][0]
    assert rep["totals"]["blocks_kept"] == rep["totals"]["blocks_total"] - 1
    student, _ = load_student(run / "finetune", torch.device("cpu"))
    student.eval()
    loaded, config = load_task(export, config_task := json.loads(res.stdout)["export"]["task"])
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(loaded(x), student(x), atol=1e-5)
    img = root / "img.png"
    Image.new("RGB", (30, 50), (10, 200, 30)).save(img)
    res = CliRunner().invoke(app, ["predict", str(export), str(img), "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["predictions"][0]["task"] == config_task
