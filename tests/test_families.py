"""Beyond ResNet: EfficientNet, MobileNetV3, RegNet and ConvNeXt as chains of universal blocks."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from datagen import make_imagefolder, randomise_bn_stats
from onnx_check import onnx_check
from PIL import Image
from typer.testing import CliRunner

from tailor_cli.adapter import load_task
from tailor_cli.backbone import describe_chain
from tailor_cli.cli import app
from tailor_cli.counting import student_macs, student_params
from tailor_cli.loading import load_student, load_teacher
from tailor_cli.proxies import PROXY_BUDGET
from tailor_cli.student import LayerSpec, Structure, Student

FAMILIES = [
    ("test_resnet", "resnet"),
    ("test_efficientnet", "efficientnet"),
    ("mobilenetv3_small_050", "mobilenetv3"),
    ("lcnet_050", "mobilenetv3"),
    ("tf_efficientnetv2_b0", "efficientnet"),
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
                                   "--device", "cpu", "--output", str(run), "--export-dir", str(export), "--json"])
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
    # issue 24: the tailored network and its teacher as standalone ONNX files, checked in ONNX Runtime on the
    # same preprocessed images at two batch sizes
    for stage, reference in (("finetune", student), ("teacher", load_teacher(run / "teacher", torch.device("cpu")))):
        res = CliRunner().invoke(app, ["export", str(run), "--export-dir", str(root / "onnx"), "--format", "onnx",
                                       "--stage", stage, "--task-name", stage, "--json"])
        assert res.exit_code == 0, res.output
        assert onnx_check(root / "onnx" / stage / "model.onnx", reference, data) <= 1e-4


# Blocks whose output ends in an activation (no residual add after it), by timm name.
_HSWISH, _SILU = torch.nn.Hardswish, torch.nn.SiLU
ACTIVATION_ENDED = [
    ("test_efficientnet", {"blocks.0.0": _SILU}),  # ConvBnAct without skip
    ("mobilenetv3_small_050", {"blocks.5.0": _HSWISH}),  # the last ConvBnAct (1x1 to 576)
    ("mobilenetv3_large_100", {"blocks.6.0": _HSWISH}),  # the last ConvBnAct (1x1 to 960)
    ("tf_efficientnetv2_b0", {"blocks.0.0": _SILU}),  # first-stage ConvBnAct, 32 -> 16 channels: no skip
    ("efficientnetv2_rw_t", {}),  # its first-stage ConvBnActs have a skip: the add comes after the activation
    ("lcnet_050", "all"),  # DepthwiseSeparableConv with pw_act and no skip: every block
]


@pytest.mark.parametrize("name,ended", ACTIVATION_ENDED)
def test_a_block_ending_in_an_activation_has_it_applied_after_the_attention_sum(name, ended):
    """x_l = act(alpha_0 G(x) + sum alpha_k A_k): G is the block without its final activation."""
    model = randomise_bn_stats(timm.create_model(name, pretrained=False, num_classes=0)).eval()
    chain = describe_chain(model)
    if ended == "all":
        ended = {info.name: _HSWISH for info in chain.infos}
    student = Student(model, 3).eval()
    found = {info.name: type(layer.act) for info, layer in zip(chain.infos, student.layers)
             if not isinstance(layer.act, torch.nn.Identity)}
    assert found == ended
    h = chain.stem(torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        for info, block, layer in zip(chain.infos, chain.blocks, student.layers):
            out = block(h)
            if info.name in ended:  # G stops before the activation; the layer applies it once
                assert not torch.equal(layer.block(h), out)
                assert torch.equal(layer.act(layer.block(h)), out)
            h = out
    # a layer whose block was pruned applies the same activation to its proxies' sum
    first = next(i for i, info in enumerate(chain.infos) if info.name in ended) if ended else None
    if first is not None:
        layers = [LayerSpec(True, []) for _ in chain.blocks]
        layers[first] = LayerSpec(False, [first])
        pruned = Student(model, 3, structure=Structure(layers))
        assert pruned.layers[first].block is None and type(pruned.layers[first].act) is ended[chain.infos[first].name]


@pytest.mark.parametrize("name", [n for n, _ in ACTIVATION_ENDED])
def test_student_without_proxies_reproduces_forward_features_and_logits(name):
    model = randomise_bn_stats(timm.create_model(name, pretrained=False, num_classes=4)).eval()
    chain = describe_chain(model)
    student = Student(model, 4, structure=Structure([LayerSpec(True, []) for _ in chain.blocks])).eval()
    student.fc.load_state_dict(model.get_classifier().state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, feats = student(x, return_features=True)
        assert torch.equal(student.tail(feats[-1]), model.forward_features(x))
        assert torch.allclose(logits, model(x), atol=1e-6, rtol=0)


def test_a_block_whose_activation_cannot_be_placed_is_refused_in_one_line():
    from tailor_cli.errors import ModelError

    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    model.blocks[0][0].aa = torch.nn.AvgPool2d(1)  # a layer after the block's final activation
    with pytest.raises(ModelError, match=r"blocks\.0\.0 \(ConvBnAct\) has layers after its final activation") as err:
        describe_chain(model)
    assert "\n" not in str(err.value)

    class Unknown(torch.nn.Module):
        def forward(self, x):
            return x

    model.blocks[0][0] = Unknown()
    with pytest.raises(ModelError, match=r"blocks\.0\.0 \(Unknown\) is not supported") as err:
        describe_chain(model)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "efficientnet_b0", "mobilenetv3_large_100", "regnetx_002",
                                  "convnext_atto"])
def test_every_proxy_is_a_small_fraction_of_the_block_it_skips(name):
    """Issue 16: a proxy that costs as much as its block saves nothing (it was 1.0x on MobileNetV3's last
    layer, 2.2x on RegNetX-002, 4x on ConvNeXt's downsamples, with the one 1x1 proxy for every family)."""
    model = timm.create_model(name, pretrained=False)
    student = Student(model, 10).eval()
    cost = student_macs(student, 64)
    ratios = [row[0] / p for row in cost.paths for p in row[1:]]
    assert min(ratios) >= PROXY_BUDGET * 0.95, f"a proxy costs 1/{min(ratios):.1f} of its block"
    params = student_params(student)
    assert params["task_specific"] < params["shared"] / 3  # the full student, before any pruning
    # dropping any one block for its cheapest proxy lowers the MACs
    assert all(min(row[1:]) < row[0] for row in cost.paths if len(row) > 1)
