"""Pretrained timm backbones seen as a chain: stem -> universal blocks -> tail -> head.

NetTailor needs from a backbone: the stem (node 0 of the student graph), the
ordered list of universal blocks (nodes 1..L) with where each one's final
activation lives, and the classifier side. :func:`describe_chain` extracts them
with one short layout function per family (ResNet, EfficientNet/MobileNetV3,
RegNet, ConvNeXt); everything else in the package works on the :class:`Chain`.

Weights come from timm's own pretrained mechanism (online, cached by the HF hub)
or from a local file: safetensors, or a timm ``.pth`` read with
``torch.load(weights_only=True)`` (:mod:`tailor_cli.weights`). Nothing a user hands us is unpickled.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from .errors import ModelError
from .weights import load_backbone_weights, read_weights_file, resolve_weights_path

SUPPORTED_FAMILIES = (
    "ResNet (resnet18/26/34/50/101/152 and their d/t/s variants, seresnet*, resnext*, test_resnet), "
    "EfficientNet (efficientnet_*, test_efficientnet), EfficientNetV2 (efficientnetv2_*, tf_efficientnetv2_*), "
    "MobileNetV3 (mobilenetv3_*), LCNet (lcnet_*), RegNet (regnetx_*, regnety_*), "
    "ConvNeXt (convnext_*, test_convnext)"
)


@dataclass(frozen=True)
class BlockInfo:
    """One universal block, as the student graph sees it.

    ``name`` is the timm module path (``"layer2.1"``); ``stage`` is 1-based and
    ``index`` 0-based within the stage, so the report can print ``2.1``.
    ``reduction`` is the total stride of the block's output w.r.t. the input image.
    ``macs_per_pixel`` is what the block costs per pixel of its output (MACs of one
    image divided by the output's height x width), which sizes its proxies.
    """

    name: str
    stage: int
    index: int
    block_type: str  # the timm class: "BasicBlock", "InvertedResidual", ...
    in_chs: int
    out_chs: int
    reduction: int
    macs_per_pixel: float


@dataclass
class Chain:
    """A backbone as a chain. Modules are *references* into the timm model.

    ``stem``: image (B,3,H,W) -> node 0. ``blocks[l-1]``: node l-1 -> node l.
    ``tail``: frozen modules the timm model runs after its blocks and before
    ``forward_head`` (EfficientNet's conv_head/bn2, RegNet's final_conv, ConvNeXt's
    norm_pre; empty for ResNet). The classifier side is the model's own
    ``forward_head`` (pooling, and MobileNetV3/ConvNeXt's frozen pre-logits layers).
    """

    family: str
    stem: nn.Sequential
    blocks: list[nn.Module]
    infos: list[BlockInfo]
    stem_chs: int
    stem_reduction: int
    num_features: int  # width of forward_head(pre_logits=True), what the task's classifier reads
    final_act_names: list[str | None]  # per block, the attribute path of its final activation (None: linear output)
    tail: nn.Sequential
    body_attrs: list[str]  # top-level attributes of the model holding stem, blocks and tail
    pool_mode: str  # how a stride-s block rounds odd sizes: "ceil" (padded 3x3 convs) or "floor" (k2s2 convs)


def check_backbone_name(name: str) -> None:
    """Fail early, with close suggestions, on a name timm does not know."""
    arch = name.split(".", 1)[0]
    if arch in timm.list_models():
        return
    close = close_names(arch, timm.list_models())
    hint = f" Did you mean: {', '.join(close)}?" if close else " See `timm.list_models('resnet*')`."
    raise ModelError(f"unknown backbone '{name}'.{hint}")


def close_names(name: str, names: list[str], n: int = 5) -> list[str]:
    """The names closest to a near miss: those it begins, in natural order (``lite0`` before ``lite1``, ``b2``
    before ``b10``), then the closest by spelling (``difflib``)."""
    def natural(text: str) -> list:
        return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]

    started = sorted((m for m in names if m.startswith(name)), key=natural)
    spelled = [m for m in difflib.get_close_matches(name, names, n=n, cutoff=0.6) if m not in started]
    return (started + spelled)[:n]


def _first_sentence(err: BaseException, limit: int = 200) -> str:
    """The start of an exception's message, cut at a word boundary (no half words in an error line)."""
    text = " ".join(str(err).split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def create_backbone(
    name: str,
    *,
    num_classes: int,
    pretrained: bool = False,
    weights: Path | None = None,
) -> nn.Module:
    """Create a timm model with a fresh ``num_classes`` classifier.

    ``weights`` (safetensors or timm ``.pth``) wins over ``pretrained``. The
    classifier of a weights file is ignored (the task has its own classes).
    """
    check_backbone_name(name)
    use_hub = pretrained and weights is None
    try:
        # Built headless, then given its classifier: the body's random init (--no-pretrained)
        # then does not depend on the number of classes.
        model = timm.create_model(name, pretrained=use_hub, num_classes=0)
        model.reset_classifier(num_classes)
        zero_classifier(model.get_classifier())
    except Exception as err:  # timm raises many kinds when offline or the tag is wrong
        if use_hub:
            raise ModelError(
                f"could not get pretrained weights for '{name}' ({type(err).__name__}: {_first_sentence(err)}); "
                "if offline, pass --weights FILE or --no-pretrained (HF_HUB_OFFLINE=1 fails at once instead of "
                "retrying)"
            ) from err
        raise ModelError(f"timm could not build '{name}': {err}") from err
    describe_chain(model)  # raises ModelError if the family is not supported
    if weights is not None:
        load_backbone_weights(model, read_weights_file(resolve_weights_path(weights)), source=str(weights))
    return model


def zero_classifier(classifier: nn.Module) -> None:
    """Start a new classifier at zero: every class equally likely (docs/method.md, "Training recipe")."""
    with torch.no_grad():
        for module in classifier.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                for tensor in (module.weight, module.bias):
                    if tensor is not None:
                        tensor.zero_()


def _family_layout(model: nn.Module):
    """(family, stem attrs, [(timm name, block, final act attr)], tail attrs, pool mode) or None."""
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.regnet import RegNet
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    blocks: list[tuple[str, nn.Module, str | None]] = []
    if isinstance(model, ResNet):
        for stage in range(1, 5):
            for i, block in enumerate(getattr(model, f"layer{stage}")):
                if isinstance(block, BasicBlock):
                    blocks.append((f"layer{stage}.{i}", block, "act2"))
                elif isinstance(block, Bottleneck):
                    blocks.append((f"layer{stage}.{i}", block, "act3"))
                else:
                    raise ModelError(f"block layer{stage}.{i} ({type(block).__name__}) is not supported; "
                                     f"supported: {SUPPORTED_FAMILIES}")
        return "resnet", ["conv1", "bn1", "act1", "maxpool"], blocks, [], "ceil"
    if isinstance(model, (EfficientNet, MobileNetV3)):
        for s, blocks_stage in enumerate(model.blocks.children()):
            for i, block in enumerate(blocks_stage.children()):
                name = f"blocks.{s}.{i}"
                blocks.append((name, block, _efficientnet_final_act(name, block)))
        tail = ["conv_head", "bn2"] if isinstance(model, EfficientNet) else []
        family = "efficientnet" if isinstance(model, EfficientNet) else "mobilenetv3"
        return family, ["conv_stem", "bn1"], blocks, tail, "ceil"
    if isinstance(model, RegNet):
        for s in range(1, 5):
            for name, block in getattr(model, f"s{s}").named_children():
                act = "act3" if hasattr(block, "act3") else None
                blocks.append((f"s{s}.{name}", block, act))
        return "regnet", ["stem"], blocks, ["final_conv"], "ceil"
    if isinstance(model, ConvNeXt):
        # The stride-2 downsample (LayerNorm + 2x2 conv) of stages 2-4 is a universal block of its own.
        for s, convnext_stage in enumerate(model.stages.children()):
            downsample = convnext_stage.get_submodule("downsample")
            if not isinstance(downsample, nn.Identity):
                blocks.append((f"stages.{s}.downsample", downsample, None))
            for i, block in enumerate(convnext_stage.get_submodule("blocks").children()):
                blocks.append((f"stages.{s}.blocks.{i}", block, None))
        return "convnext", ["stem"], blocks, ["norm_pre"], "floor"
    return None


def _efficientnet_final_act(name: str, block: nn.Module) -> str | None:
    """Where an EfficientNet/MobileNetV3 block's final activation lives (dotted path), or None if it ends linearly.

    Each block kind's last norm is a BatchNormAct2d whose ``act`` (after its ``drop``) is the
    block's last op unless a residual add follows: ConvBnAct (``bn1``; EfficientNetV2's first
    stages, MobileNetV3's last block), DepthwiseSeparableConv (``bn2``, an activation with
    ``pw_act``: LCNet). Inverted residuals, EdgeResidual, CondConv and MobileNetV4's universal
    inverted residuals end in a norm without activation, its attention blocks in a layer scale.
    Other kinds raise :class:`ModelError`, as does an activation followed by more layers.
    """
    from timm.models._efficientnet_blocks import (
        ConvBnAct,
        DepthwiseSeparableConv,
        EdgeResidual,
        InvertedResidual,
        MobileAttention,
        UniversalInvertedResidual,
    )

    if isinstance(block, MobileAttention):  # MobileNetV4 hybrids: norm first, attention, layer scale: linear
        return None
    if isinstance(block, ConvBnAct):
        norm, after = "bn1", ["aa"]
    elif isinstance(block, DepthwiseSeparableConv):
        norm, after = "bn2", []
    elif isinstance(block, InvertedResidual):  # CondConvResidual too
        norm, after = "bn3", []
    elif isinstance(block, EdgeResidual):
        norm, after = "bn2", []
    elif isinstance(block, UniversalInvertedResidual):
        last = "pw_proj" if isinstance(block.dw_end, nn.Identity) else "dw_end"
        norm, after = f"{last}.bn", [f"{last}.aa", "layer_scale"]
    else:
        raise ModelError(f"block {name} ({type(block).__name__}) is not supported: nettailor cannot tell where its "
                         f"activation is; supported: {SUPPORTED_FAMILIES}")
    act = getattr(block.get_submodule(norm), "act", None)
    if getattr(block, "has_skip", False) or act is None or isinstance(act, nn.Identity):
        return None  # ends in the residual add, or in a norm without activation
    if any(not isinstance(_submodule_or_identity(block, a), nn.Identity) for a in after):
        raise ModelError(f"block {name} ({type(block).__name__}) has layers after its final activation; "
                         "the activation cannot be moved after the attention sum")
    return f"{norm}.act"


def _submodule_or_identity(module: nn.Module, path: str) -> nn.Module:
    """``module.get_submodule(path)``, or an Identity where the path (or a part of it) is absent or None."""
    for part in path.split("."):
        child = getattr(module, part, None)
        if child is None:
            return nn.Identity()
        module = child
    return module


def describe_chain(model: nn.Module) -> Chain:
    """View a timm CNN as stem + ordered universal blocks + tail + head.

    Families: ResNet (BasicBlock, Bottleneck), EfficientNet/EfficientNetV2/MobileNetV3/LCNet
    (their inverted-residual and conv blocks), RegNet (X and Y), ConvNeXt. Anything else
    (transformers, non-chain networks) raises :class:`ModelError`.
    """
    layout = _family_layout(model)
    if layout is None:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise ModelError(f"backbone '{arch}' is not supported (not a chain of blocks); supported: {SUPPORTED_FAMILIES}")
    family, stem_attrs, entries, tail_attrs, pool_mode = layout
    stem = nn.Sequential(OrderedDict((a, getattr(model, a)) for a in stem_attrs))
    tail = nn.Sequential(OrderedDict((a, getattr(model, a)) for a in tail_attrs))
    blocks = [b for _, b, _ in entries]
    # Shapes, total strides and block costs from a tiny dry run (robust to anti-aliased and deep stems).
    shapes, block_macs, num_features = _dry_run(model, stem, blocks, tail, size=64)
    (stem_chs, stem_h), block_shapes = shapes[0], shapes[1:]
    infos = []
    in_chs, stage, index, prev = stem_chs, 0, 0, None
    for (name, block, _), (out_chs, h), macs in zip(entries, block_shapes, block_macs):
        key = ".".join(name.split(".")[:2]) if family == "convnext" else name.rsplit(".", 1)[0]
        stage, index = (stage + 1, 0) if key != prev else (stage, index + 1)
        prev = key
        infos.append(BlockInfo(name, stage, index, type(block).__name__, in_chs, out_chs, 64 // h, macs / (h * h)))
        in_chs = out_chs
    body = list(dict.fromkeys(stem_attrs + [n.split(".")[0] for n, _, _ in entries] + tail_attrs))
    return Chain(family, stem, blocks, infos, stem_chs, 64 // stem_h, num_features,
                 [a for _, _, a in entries], tail, body, pool_mode)


def head_only_copy(model: nn.Module, chain: Chain) -> nn.Module:
    """A copy of ``model`` without its body (stem, blocks, tail) and without its classifier.

    Its ``forward_head(x, pre_logits=True)`` is the frozen classifier side of the
    network (pooling, plus pre-logits layers where the family has them).
    """
    saved = {a: getattr(model, a) for a in chain.body_attrs}
    try:
        for a in saved:
            setattr(model, a, nn.Identity())
        head = copy.deepcopy(model)
    finally:
        for a, m in saved.items():
            setattr(model, a, m)
    head.reset_classifier(0)
    return head


@torch.no_grad()
def _dry_run(model: nn.Module, stem: nn.Module, blocks: list[nn.Module], tail: nn.Module,
             size: int) -> tuple[list[tuple[int, int]], list[int], int]:
    """For one ``size`` x ``size`` image: (channels, height) of node 0..L, the MACs of each
    block (``FlopCounterMode`` FLOPs / 2) and the pre-logits width.

    Runs in eval mode, so BN statistics are not touched.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = stem(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
        shapes, macs = [(x.shape[1], x.shape[2])], []
        for block in blocks:
            with FlopCounterMode(display=False) as counter:
                x = block(x)
            shapes.append((x.shape[1], x.shape[2]))
            macs.append(counter.get_total_flops() // 2)
        width = model.forward_head(tail(x), pre_logits=True).shape[-1]
    finally:
        model.train(was_training)
    return shapes, macs, int(width)


def universal_block(block: nn.Module, act_name: str | None) -> tuple[nn.Module, nn.Module]:
    """Copy of ``block`` with its final activation removed, plus that activation.

    The student applies the activation once, after the attention-weighted sum
    (docs/method.md). ``act_name`` is an attribute path into the block: ``"act2"`` (ResNet)
    or ``"bn1.act"`` (the activation inside a timm BatchNormAct2d, whose ``drop`` stays in
    the block: it comes before the activation). Blocks that end linearly (``act_name=None``:
    inverted residuals, ConvNeXt blocks, downsample layers) keep everything and the
    activation is the identity. The copy shares nothing with the original.
    """
    block = copy.deepcopy(block)
    if act_name is None:
        return block, nn.Identity()
    parent, _, attr = act_name.rpartition(".")
    owner = block.get_submodule(parent)
    act = getattr(owner, attr)
    setattr(owner, attr, nn.Identity())
    return block, act


def block_activation(block: nn.Module, act_name: str | None) -> nn.Module:
    """A copy of the final activation that :func:`universal_block` moves out (Identity for ``None``)."""
    return copy.deepcopy(block.get_submodule(act_name)) if act_name else nn.Identity()


def backbone_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The shared, frozen tensors of a backbone: every *parameter* except the classifier.

    BatchNorm running statistics are not shared: each task adapts and stores its own.
    """
    classifier = model.pretrained_cfg.get("classifier", "fc")
    return {
        k: v.detach()
        for k, v in model.named_parameters()
        if not k.startswith(classifier + ".")
    }


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Canonical hash of named tensors: name, dtype, shape and bytes, in sorted name order.

    Independent of file layout, so a re-saved file with the same tensors keeps its hash.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return digest.hexdigest()


def backbone_identity(model: nn.Module, *, name: str, weights: Path | None, pretrained: bool) -> dict:
    """What an adapter records about its base model (PEFT's ``base_model_name_or_path``)."""
    cfg = model.pretrained_cfg
    if weights is not None:
        source = str(weights) if str(weights).startswith("pkg:") else f"file:{Path(weights).name}"
    elif pretrained:
        source = f"timm:{cfg.get('architecture')}.{cfg.get('tag')}" if cfg.get("tag") else f"timm:{cfg.get('architecture')}"
    else:
        source = "random-init"
    return {
        "name": name,
        "architecture": cfg.get("architecture"),
        "pretrained_tag": cfg.get("tag") if (pretrained or weights) else None,
        "weights_source": source,
        "sha256": tensors_sha256(backbone_tensors(model)),
    }
