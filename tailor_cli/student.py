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
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import BlockInfo, block_activation, describe_chain, head_only_copy, universal_block, zero_classifier
from .errors import RunError
from .pooling import fast_stem, make_pool, run_stem
from .proxies import Proxy, proxy_form
from .structure import LayerSpec, Structure

__all__ = ["LayerSpec", "Proxy", "Structure", "Student", "TailoredLayer", "teacher_forward"]

BLOCK_LOGIT_INIT = 2.0


PROXY_LOGIT_INIT = -2.0


class TailoredLayer(nn.Module):
    """One layer of the student: optional universal block, proxies, attention logits, activation."""

    block: nn.Module | None
    proxies: nn.ModuleDict  # source node (as str) -> Proxy
    sources: list[int]  # the proxies' source nodes, in attention order after the block
    logits: nn.Parameter
    act: nn.Module

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

    ``train_bn``: the BatchNorm scale and shift of the stem, the blocks and the tail are trained
    and task-specific (stored with the task, like the BN statistics) instead of frozen and shared
    (the paper's student, the default). LayerNorms (ConvNeXt) stay frozen either way.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        max_skip: int = 3,
        structure: Structure | None = None,
        train_bn: bool = False,
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

        self.stem = fast_stem(copy.deepcopy(chain.stem))
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
        zero_classifier(self.fc)
        self.num_classes = num_classes
        self.train_bn = bool(train_bn)
        self._task_bn: dict[str, nn.Parameter] = self._task_bn_parameters() if self.train_bn else {}
        for p in self.frozen_parameters():
            p.requires_grad_(False)
        # For inference: after which layer each node can be freed.
        self._last_use = self._compute_last_use()
        self._plan: list[tuple] | None = None  # built on first forward

    # -- bookkeeping -------------------------------------------------------------------
    def stride(self, source: int, layer: int) -> int:
        return self.node_reduction[layer] // self.node_reduction[source]

    def _universal_modules(self) -> list[nn.Module]:
        blocks = [layer.block for layer in self.tailored_layers() if layer.block is not None]
        return [self.stem, self.tail, self.head, *blocks]

    def _task_bn_parameters(self) -> dict[str, nn.Parameter]:
        """``train_bn``: the BatchNorm weights and biases of the universal modules, by state-dict key."""
        out: dict[str, nn.Parameter] = {}
        for name, module in self.named_modules():
            universal = name.split(".", 1)[0] in ("stem", "tail", "head") or ".block." in f"{name}."
            if universal and isinstance(module, nn.modules.batchnorm._BatchNorm):
                out.update({f"{name}.{p}": param for p, param in module.named_parameters(recurse=False)})
        return out

    def frozen_parameters(self):
        """The shared universal parameters (stem, blocks, tail, head): never trained (with ``train_bn``,
        all but their BatchNorm scales and shifts)."""
        task = {id(p) for p in self._task_bn.values()}
        for module in self._universal_modules():
            yield from (p for p in module.parameters() if id(p) not in task)

    def tailored_layers(self) -> list[TailoredLayer]:
        """``self.layers`` as what they are (an ``nn.ModuleList`` yields plain modules to a type checker)."""
        return cast("list[TailoredLayer]", list(self.layers))

    def attention_parameters(self) -> list[nn.Parameter]:
        return [layer.logits for layer in self.tailored_layers() if layer.alive]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Proxies, attention logits, classifier (and, with ``train_bn``, the universal BatchNorms' affine)."""
        params = [p for layer in self.layers for p in layer.proxies.parameters()]
        return params + self.attention_parameters() + list(self.fc.parameters()) + list(self._task_bn.values())

    def timm_name(self, key: str) -> str | None:
        """Map a student state-dict key of a universal tensor to the timm key (``None`` if task-specific)."""
        if key in self._task_bn:
            return None
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
        for layer, old, new in zip(self.tailored_layers(), self.structure.layers, structure.layers):
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
        self._task_bn = self._task_bn_parameters() if self.train_bn else {}
        self._last_use = self._compute_last_use()
        self._plan = None

    # -- forward ---------------------------------------------------------------------
    def attention(self) -> list[torch.Tensor | None]:
        """Per layer, softmax over its surviving paths (``None`` for a dead layer)."""
        return [F.softmax(layer.logits, dim=0) if layer.alive else None for layer in self.tailored_layers()]

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


def teacher_forward(model: nn.Module, chain, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run a fine-tuned timm ResNet block by block.

    ``chain`` is ``describe_chain(model)`` (computed once by the caller).
    Returns logits (B, classes) and each block's output t_1..t_L (after its activation).
    """
    h = run_stem(chain.stem, x)
    feats = []
    for block in chain.blocks:
        h = block(h)
        feats.append(h)
    return model.forward_head(chain.tail(h)), feats
