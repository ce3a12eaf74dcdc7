"""The NetTailor student: frozen universal blocks, cheap proxies, per-layer attention.

Graph (docs/method.md, "The student"): node 0 is the stem output, node l the
output of layer l (l = 1..L). Layer l computes

    x_l = act( alpha_l,0 * G_l(x_{l-1}) + sum_k alpha_l,k * A_l,k(x_{l-k}) )

with ``G_l`` the pretrained residual block without its final activation,
``A_l,k`` a proxy reading node ``l-k`` (k = 1..max_skip), and
``alpha_l = softmax(logits_l)`` over the layer's *surviving* paths.

A :class:`Structure` says which paths exist. Pruning produces a smaller
structure, and a :class:`Student` built from it holds (and runs) nothing else.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import BlockInfo, block_activation, describe_chain, head_only_copy, universal_block
from .errors import RunError

BLOCK_LOGIT_INIT = 2.0
PROXY_LOGIT_INIT = -2.0


# --------------------------------------------------------------------------- structure
@dataclass
class LayerSpec:
    """Which paths enter one layer: the universal block, and proxies by source node."""

    block: bool
    proxies: list[int] = field(default_factory=list)  # source nodes, nearest first

    @property
    def alive(self) -> bool:
        return self.block or bool(self.proxies)

    def path_keys(self) -> list[str]:
        """Names of the paths in attention order: ``"block"`` then ``"proxy<src>"``."""
        return (["block"] if self.block else []) + [f"proxy{s}" for s in self.proxies]


@dataclass
class Structure:
    """The surviving graph of a student: one :class:`LayerSpec` per layer 1..L."""

    layers: list[LayerSpec]

    @classmethod
    def full(cls, num_layers: int, max_skip: int) -> "Structure":
        """Every block and every proxy from nodes l-1 .. l-max_skip (node 0 the earliest)."""
        return cls([
            LayerSpec(True, [l - k for k in range(1, max_skip + 1) if l - k >= 0])
            for l in range(1, num_layers + 1)
        ])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def readers(self, node: int) -> list[tuple[int, str]]:
        """Paths ``(layer, key)`` that read ``node``."""
        out = []
        for l, spec in enumerate(self.layers, 1):
            if spec.block and l - 1 == node:
                out.append((l, "block"))
            out += [(l, f"proxy{s}") for s in spec.proxies if s == node]
        return out

    def to_json(self) -> list[dict]:
        return [{"block": s.block, "proxies": list(s.proxies)} for s in self.layers]

    @classmethod
    def from_json(cls, obj) -> "Structure":
        try:
            return cls([LayerSpec(bool(d["block"]), [int(s) for s in d["proxies"]]) for d in obj])
        except (TypeError, KeyError, ValueError) as err:
            raise RunError(f"invalid student structure in config ({err!r})") from err

    def counts(self) -> dict:
        return {
            "blocks": sum(s.block for s in self.layers),
            "proxies": sum(len(s.proxies) for s in self.layers),
            "layers_alive": sum(s.alive for s in self.layers),
        }


# --------------------------------------------------------------------------- modules
def _init_new(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.01)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


PROXY_BUDGET = 12  # a proxy costs at most 1/PROXY_BUDGET of the block it stands in for (where it can)
MIN_PROXY_WIDTH = 8


@dataclass(frozen=True)
class ProxyForm:
    """The shape of one proxy (docs/method.md, "Proxies"); all are 1x1 convolutions, no activation at the end.

    ``"dense"``: 1x1 conv + BN, the paper's proxy. ``"lowrank"``: 1x1 conv to ``width`` + BN + ReLU +
    1x1 conv + BN. ``"grouped"``: 1x1 conv in ``groups`` groups + BN.
    """

    kind: str
    width: int = 0
    groups: int = 1

    def macs_per_pixel(self, in_chs: int, out_chs: int) -> int:
        if self.kind == "lowrank":
            return self.width * (in_chs + out_chs)
        return in_chs * out_chs // self.groups

    def describe(self) -> str:
        return {"dense": "1x1", "lowrank": f"1x1>{self.width}>1x1", "grouped": f"1x1/{self.groups}g"}[self.kind]


def proxy_form(in_chs: int, out_chs: int, block_macs_per_pixel: float, budget: int = PROXY_BUDGET) -> ProxyForm:
    """The most expressive proxy costing at most ``block_macs_per_pixel / budget`` per output pixel.

    In order: the dense 1x1 (ResNet BasicBlocks, ConvNeXt blocks, most inverted residuals); a
    low-rank pair of 1x1s, its width the largest multiple of 8 that fits (ResNet Bottlenecks,
    RegNet's grouped blocks, 1x1 conv blocks, ConvNeXt's downsamples); for blocks too cheap for
    a rank of 8 (the thin depthwise-separable first blocks of EfficientNet and MobileNetV3) a
    grouped 1x1 with the fewest groups that fits, or as many as the channels allow.
    """
    limit = block_macs_per_pixel / budget
    if in_chs * out_chs <= limit:
        return ProxyForm("dense")
    width = int(limit // (in_chs + out_chs)) // 8 * 8
    if width >= MIN_PROXY_WIDTH:
        return ProxyForm("lowrank", width=width)
    common = math.gcd(in_chs, out_chs)
    divisors = [g for g in range(1, common + 1) if common % g == 0]
    groups = next((g for g in divisors if in_chs * out_chs / g <= limit), common)
    return ProxyForm("grouped", groups=groups) if groups > 1 else ProxyForm("dense")


class Proxy(nn.Module):
    """A cheap path into a layer, of the given :class:`ProxyForm`. Input: the source node, already
    pooled to the target size. (B, in_chs, H, W) -> (B, out_chs, H, W). No activation at the end:
    the layer applies it.
    """

    def __init__(self, in_chs: int, out_chs: int, form: ProxyForm = ProxyForm("dense")):
        super().__init__()
        self.form = form
        if form.kind == "lowrank":
            self.body = nn.Sequential(
                nn.Conv2d(in_chs, form.width, 1, bias=False), nn.BatchNorm2d(form.width), nn.ReLU(inplace=True),
                nn.Conv2d(form.width, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs),
            )
        else:
            self.body = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, groups=form.groups, bias=False),
                                      nn.BatchNorm2d(out_chs))
        _init_new(self)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``scale`` (a 0-dim attention weight) multiplies the output, folded into the last BN's affine.

        ``scale * BN(z)`` equals BN(z) with weight and bias times ``scale``: folding saves a pass over
        the output forward, and backward a pass plus a full-size saved tensor (the plain product
        would keep ``BN(z)`` alive for the gradient of ``scale``).
        """
        if scale is None:
            return self.body(x)
        *head, bn = self.body
        for m in head:
            x = m(x)
        return _scaled_batch_norm(bn, x, scale)


def _scaled_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale * bn(x)`` in one BatchNorm call (same running-statistics bookkeeping as ``bn(x)``).

    A plain ``nn.BatchNorm2d`` is computed here with ``F.batch_norm``. Any other BatchNorm
    (torchrun's SyncBatchNorm or all-reduce BN, see :func:`tailor_cli.distributed.convert_batchnorm`)
    runs its own forward, whose statistics cover the global batch, with the scale folded into
    the weight and bias it reads.
    """
    if type(bn) is not nn.BatchNorm2d:
        if bn.weight is None:
            return bn(x) * scale
        folded = {"weight": bn.weight * scale} | ({"bias": bn.bias * scale} if bn.bias is not None else {})
        return torch.func.functional_call(bn, folded, (x,))
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    weight = bn.weight * scale if bn.weight is not None else scale.expand(x.shape[1])
    bias = bn.bias * scale if bn.bias is not None else None
    return F.batch_norm(x, bn.running_mean if track else None, bn.running_var if track else None,
                        weight, bias, use_batch_stats, momentum, bn.eps)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that computes its values faster when no gradient flows (see :func:`_pool`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pool(self, x)


def make_pool(stride: int, mode: str = "ceil") -> nn.Module:
    """Max-pool by ``stride`` to the size the blocks produce.

    ``"ceil"`` (padded 3x3 stride-2 convs: ResNet, EfficientNet, RegNet): kernel s+1, padding
    s//2, output ceil(H/s). ``"floor"`` (2x2 stride-2 convs: ConvNeXt): kernel s, output floor(H/s).
    """
    if stride == 1:
        return nn.Identity()
    if mode == "floor":
        return MaxPool2d(kernel_size=stride, stride=stride, padding=0)
    return MaxPool2d(kernel_size=stride + 1, stride=stride, padding=stride // 2)


def _fast_stem(stem: nn.Sequential) -> nn.Sequential:
    """The student's own copy of the stem, its plain max-pools swapped for :class:`MaxPool2d`."""
    for name, m in stem.named_children():
        if type(m) is nn.MaxPool2d:
            fast = MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.return_indices, m.ceil_mode)
            setattr(stem, name, fast)
    return stem


class TailoredLayer(nn.Module):
    """One layer of the student: optional universal block, proxies, attention logits, activation."""

    def __init__(self, spec: LayerSpec, block: nn.Module | None, act: nn.Module, proxies: dict[int, Proxy]):
        super().__init__()
        self.block = block
        self.proxies = nn.ModuleDict({str(s): proxies[s] for s in spec.proxies})
        self.sources = list(spec.proxies)
        init = [BLOCK_LOGIT_INIT] * int(spec.block) + [PROXY_LOGIT_INIT] * len(spec.proxies)
        self.logits = nn.Parameter(torch.tensor(init, dtype=torch.float32))
        self.act = act

    @property
    def alive(self) -> bool:
        return self.block is not None or len(self.sources) > 0


class Student(nn.Module):
    """The tailored network for one task.

    Built from a pretrained timm backbone (its stem and blocks are deep-copied,
    frozen, and their final activation moved after the attention sum) and a
    :class:`Structure`. Input (B,3,H,W) at any size the backbone accepts;
    output logits (B, num_classes), and optionally the node tensors x_1..x_L
    (``None`` for dead layers) that the teacher term compares.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        max_skip: int = 3,
        structure: Structure | None = None,
    ):
        super().__init__()
        chain = describe_chain(backbone)
        num_layers = len(chain.blocks)
        self.structure = structure or Structure.full(num_layers, max_skip)
        if self.structure.num_layers != num_layers:
            raise RunError(
                f"structure has {self.structure.num_layers} layers but the backbone has {num_layers}"
            )
        self.max_skip = max_skip
        self.infos: list[BlockInfo] = chain.infos
        self.node_chs = [chain.stem_chs] + [i.out_chs for i in chain.infos]
        self.node_reduction = [chain.stem_reduction] + [i.reduction for i in chain.infos]

        self.stem = _fast_stem(copy.deepcopy(chain.stem))
        layers = []
        for l, spec in enumerate(self.structure.layers, 1):
            info = chain.infos[l - 1]
            if spec.block:
                block, act = universal_block(chain.blocks[l - 1], chain.final_act_names[l - 1])
            else:
                block, act = None, block_activation(chain.blocks[l - 1], chain.final_act_names[l - 1])
            proxies = {s: Proxy(self.node_chs[s], info.out_chs, proxy_form(self.node_chs[s], info.out_chs, info.macs_per_pixel))
                       for s in spec.proxies}
            layers.append(TailoredLayer(spec, block, act, proxies))
        self.layers = nn.ModuleList(layers)
        self.pool_mode = chain.pool_mode
        self.pools = nn.ModuleDict({
            str(s): make_pool(s, self.pool_mode)
            for s in sorted({self.stride(src, l) for l, spec in enumerate(self.structure.layers, 1) for src in spec.proxies})
        })
        # The frozen classifier side: the family's tail (e.g. EfficientNet's conv_head) and the
        # model's own forward_head up to its pre-logits (pooling, MobileNetV3/ConvNeXt layers).
        self.tail = copy.deepcopy(chain.tail)
        self.head = head_only_copy(backbone, chain)
        self.fc = nn.Linear(chain.num_features, num_classes)
        self.num_classes = num_classes
        for p in self.frozen_parameters():
            p.requires_grad_(False)
        # For inference: after which layer each node can be freed.
        self._last_use = self._compute_last_use()
        self._plan = None  # built on first forward

    # -- bookkeeping -------------------------------------------------------------------
    def stride(self, source: int, layer: int) -> int:
        return self.node_reduction[layer] // self.node_reduction[source]

    def frozen_parameters(self):
        """The shared universal parameters (stem, blocks, tail, head): never trained."""
        yield from self.stem.parameters()
        yield from self.tail.parameters()
        yield from self.head.parameters()
        for layer in self.layers:
            if layer.block is not None:
                yield from layer.block.parameters()

    def attention_parameters(self) -> list[nn.Parameter]:
        return [layer.logits for layer in self.layers if layer.alive]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Proxies, attention logits, classifier."""
        params = [p for layer in self.layers for p in layer.proxies.parameters()]
        return params + self.attention_parameters() + list(self.fc.parameters())

    def timm_name(self, key: str) -> str | None:
        """Map a student state-dict key of a universal tensor to the timm key (``None`` if task-specific)."""
        for prefix in ("stem.", "tail.", "head."):
            if key.startswith(prefix):
                return key[len(prefix):]
        if key.startswith("layers.") and ".block." in key:
            l, rest = key[len("layers."):].split(".block.", 1)
            return f"{self.infos[int(l)].name}.{rest}"
        return None

    def _compute_last_use(self) -> list[int]:
        last = [0] * (len(self.layers) + 1)
        for l, spec in enumerate(self.structure.layers, 1):
            if spec.block:
                last[l - 1] = max(last[l - 1], l)
            for s in spec.proxies:
                last[s] = max(last[s], l)
        last[-1] = len(self.layers) + 1  # the classifier reads the last node
        return last

    def prune_(self, structure: Structure) -> None:
        """Physically remove every module ``structure`` drops; survivors keep their weights.

        Attention logits are sliced to the surviving paths, so the softmax runs over them only.
        """
        for layer, old, new in zip(self.layers, self.structure.layers, structure.layers):
            old_keys, new_keys = old.path_keys(), new.path_keys()
            if not set(new_keys) <= set(old_keys):
                raise RunError(f"cannot prune to a structure with new paths {set(new_keys) - set(old_keys)}")
            keep = [old_keys.index(k) for k in new_keys]
            layer.logits = nn.Parameter(layer.logits.detach()[keep].clone())
            if not new.block:
                layer.block = None
            for s in old.proxies:
                if s not in new.proxies:
                    del layer.proxies[str(s)]
            layer.sources = list(new.proxies)
        self.structure = Structure.from_json(structure.to_json())
        strides = {self.stride(src, l) for l, spec in enumerate(self.structure.layers, 1) for src in spec.proxies}
        for key in list(self.pools.keys()):
            if int(key) not in strides:
                del self.pools[key]
        self._last_use = self._compute_last_use()
        self._plan = None

    # -- forward ---------------------------------------------------------------------
    def attention(self) -> list[torch.Tensor | None]:
        """Per layer, softmax over its surviving paths (``None`` for a dead layer)."""
        return [F.softmax(layer.logits, dim=0) if layer.alive else None for layer in self.layers]

    def _make_plan(self) -> list[tuple]:
        """What :meth:`forward` does per alive layer, computed once per structure (O(L) per forward).

        Per alive layer: ``(l, layer, proxies, free)`` with ``proxies`` a list of
        ``(proxy key, (source, stride), pool key)`` and ``free`` the nodes no later layer reads.
        """
        last = self._last_use
        alive = [l for l, layer in enumerate(self.layers, 1) if layer.alive]
        free_at: dict[int, list[int]] = {l: [] for l in alive}
        for node in range(len(self.layers)):  # the last node is read by the classifier
            after = max(last[node], node + 1)  # a node nobody reads goes after the next layer
            when = next((l for l in alive if l >= after), None)
            if when is not None:
                free_at[when].append(node)
        plan = []
        for l in alive:
            layer = self.layers[l - 1]
            proxies = [(str(src), (src, self.stride(src, l)), str(self.stride(src, l))) for src in layer.sources]
            plan.append((l, layer, proxies, free_at[l]))
        return plan

    def forward(
        self,
        x: torch.Tensor,
        *,
        alphas: list[torch.Tensor | None] | None = None,
        return_features: bool = False,
    ):
        if alphas is None:
            alphas = self.attention()
        plan = self.__dict__.get("_plan")
        if plan is None:
            plan = self._plan = self._make_plan()
        nodes: list[torch.Tensor | None] = [None] * (len(self.layers) + 1)
        nodes[0] = self.stem(x)
        pooled: dict[tuple[int, int], torch.Tensor] = {}
        for l, layer, proxies, free in plan:
            a = alphas[l - 1]
            weighted = a.numel() > 1  # a softmax over one path is exactly 1: no scaling at all
            k = 1 if layer.block is not None else 0
            out = None
            for j, (name, key, pool) in enumerate(proxies):
                p = pooled.get(key)
                if p is None:  # proxies reading the same node at the same stride share the pooling
                    p = pooled[key] = self.pools[pool](nodes[key[0]])
                y = layer.proxies[name](p, a[k + j] if weighted else None)  # alpha folded into its BN
                out = y if out is None else out.add_(y)  # y is fresh and saved by no one: in place
            if layer.block is not None:
                g = layer.block(nodes[l - 1])
                # alpha_0 * G added to the proxies' sum in one fused in-place pass
                out = g if out is None else out.addcmul_(g, a[0])
            nodes[l] = layer.act(out)
            if not return_features:  # free what no later layer reads
                for i in free:
                    nodes[i] = None
                    for s in [kk for kk in pooled if kk[0] == i]:
                        del pooled[s]
        last = nodes[-1]
        if last is None:
            raise RunError("the last layer of the student is dead; the structure is disconnected")
        logits = self.fc(self.head.forward_head(self.tail(last), pre_logits=True))
        if return_features:
            return logits, nodes[1:]
        return logits


def _run_stem(stem: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``stem(x)`` for a stem we must not modify (the teacher's), max-pools as in :func:`_pool`."""
    if not isinstance(stem, nn.Sequential):
        return stem(x)
    for m in stem:
        x = _pool(m, x) if type(m) is nn.MaxPool2d else m(x)
    return x


def _pool(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``pool(x)``, faster for a large NCHW tensor on the CPU; the values (and gradients) are identical.

    PyTorch's CPU max-pool kernel for NCHW tensors is scalar (it was the student's costliest
    elementwise op in the profile); the channels-last kernel is vectorised over channels. With a
    gradient, pool a channels-last copy (same argmax rule, so the same gradient on ties) and
    convert back; without one (stems, inference), a separable max over strided views needs
    no indices at all.
    """
    if not isinstance(pool, nn.MaxPool2d):
        return pool(x)
    if (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.numel() >= _FAST_POOL_MIN_NUMEL
        and x.is_contiguous()
        and not x.is_contiguous(memory_format=torch.channels_last)
        and not pool.ceil_mode
        and not pool.return_indices
        and _pair(pool.dilation) == (1, 1)
    ):
        if not (x.requires_grad and torch.is_grad_enabled()):
            return _max_pool_nograd(x, _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding))
        return nn.MaxPool2d.forward(pool, x.contiguous(memory_format=torch.channels_last)).contiguous()
    return nn.MaxPool2d.forward(pool, x)


_FAST_POOL_MIN_NUMEL = 32768  # below this the plain kernel's single call is as fast


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _max_pool_nograd(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """``F.max_pool2d(x, kernel, stride, padding)`` (floor mode) as a max over rows, then columns."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    H, W = x.shape[-2:]
    ho, wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    if kh < 2 or kw < 2 or ho < 1 or wo < 1 or 2 * ph > kh or 2 * pw > kw:
        return F.max_pool2d(x, kernel, stride, padding)
    xp = F.pad(x, (pw, pw, ph, ph), value=float("-inf")) if ph or pw else x
    rows = [xp[..., i:i + sh * (ho - 1) + 1:sh, :] for i in range(kh)]
    v = torch.maximum(rows[0], rows[1])
    for r in rows[2:]:
        torch.maximum(v, r, out=v)
    cols = [v[..., j:j + sw * (wo - 1) + 1:sw] for j in range(kw)]
    out = torch.maximum(cols[0], cols[1])
    for c in cols[2:]:
        torch.maximum(out, c, out=out)
    return out


# --------------------------------------------------------------------------- teacher view
def teacher_forward(model: nn.Module, chain, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run a fine-tuned timm ResNet block by block.

    ``chain`` is ``describe_chain(model)`` (computed once by the caller).
    Returns logits (B, classes) and each block's output t_1..t_L (after its activation).
    """
    h = _run_stem(chain.stem, x)
    feats = []
    for block in chain.blocks:
        h = block(h)
        feats.append(h)
    return model.forward_head(chain.tail(h)), feats
