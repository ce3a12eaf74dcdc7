"""Pruning (docs/method.md, "Pruning"): a pure function from attention to a smaller structure.

1. drop every path whose alpha < threshold: proxies, and universal blocks too (a block the
   attention already left contributes almost nothing, so dropping it is free; the paper's step 1
   covers proxies only, and K then had to be large enough to catch such blocks);
2. drop the ``drop_blocks`` universal blocks with the lowest alpha (those of step 1 are the lowest,
   so they count towards K: a block count of ``max(K, blocks under the threshold)``);
3. to a fixpoint: a node with no incoming path is dead (paths reading it go), a
   node other than the last that nobody reads is dead (paths into it go).
The last node must survive, or the classifier would be disconnected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UsageError
from .structure import LayerSpec, Structure


class PruneError(UsageError):
    """A pruning request that cannot be honoured (exit code 2)."""


@dataclass
class PruneResult:
    structure: Structure
    removed_proxies: list[tuple[int, int]]  # (layer, source) under the threshold
    removed_blocks: list[int]  # layers whose block was under the threshold or among the K lowest
    free_blocks: list[int]  # layers whose block was under the threshold (removed whatever K)
    orphaned: list[str]  # paths removed by the fixpoint, e.g. "layer 3 proxy1"
    rounds: int


def validate_args(threshold: float, drop_blocks: int, num_blocks: int) -> None:
    if not 0.0 <= threshold < 1.0:
        raise PruneError(f"--threshold must be in [0, 1), got {threshold}")
    if not 0 <= drop_blocks <= num_blocks:
        raise PruneError(f"--drop-blocks must be between 0 and {num_blocks} (the student's universal blocks), got {drop_blocks}")


def plan(structure: Structure, alphas: list[list[float]], *, threshold: float, drop_blocks: int) -> PruneResult:
    """Return the pruned structure. ``alphas[l-1]`` lists layer l's attention in path order.

    A pruning that disconnects the classifier is refused with the values that would work.
    """
    num_blocks = sum(s.block for s in structure.layers)
    validate_args(threshold, drop_blocks, num_blocks)
    result = _plan(structure, alphas, threshold=threshold, drop_blocks=drop_blocks)
    if result is None:
        raise PruneError(
            f"this pruning disconnects the classifier (no path reaches layer {structure.num_layers}); "
            + disconnect_advice(structure, alphas, threshold=threshold, drop_blocks=drop_blocks)
        )
    return result


def disconnect_advice(structure: Structure, alphas: list[list[float]], *, threshold: float, drop_blocks: int) -> str:
    """What would connect the classifier: the largest K at this threshold, the largest threshold at this K."""
    advice = []
    k = next((k for k in range(drop_blocks - 1, -1, -1)
              if _plan(structure, alphas, threshold=threshold, drop_blocks=k) is not None), None)
    if k is not None:
        advice.append(f"at --threshold {threshold}, --drop-blocks {k} is the most that keeps it connected")
    t = connecting_threshold(structure, alphas, threshold=threshold, drop_blocks=drop_blocks)
    if t is not None:
        advice.append(f"with --drop-blocks {drop_blocks}, --threshold {t:g} or lower does")
    else:
        advice.append(f"no threshold keeps it connected with --drop-blocks {drop_blocks}")
    return "; ".join(advice) + "; or let nettailor search K (`prune --auto`, or `run` without --drop-blocks)"


def connecting_threshold(structure: Structure, alphas: list[list[float]], *, threshold: float,
                         drop_blocks: int) -> float | None:
    """The largest threshold under ``threshold`` that keeps the classifier connected at ``drop_blocks``.

    Keeping more paths never disconnects, so it is one of the attention values (or 0); it is shown
    rounded down, which keeps at least as many paths. None when even 0 disconnects.
    """
    lower = sorted({a for layer in alphas for a in layer if a < threshold} | {0.0}, reverse=True)
    t = next((t for t in lower if _plan(structure, alphas, threshold=t, drop_blocks=drop_blocks) is not None), None)
    return None if t is None else math.floor(t * 1e4) / 1e4


def _plan(structure: Structure, alphas: list[list[float]], *, threshold: float, drop_blocks: int) -> PruneResult | None:
    """:func:`plan` without the checks; None when the classifier is disconnected."""
    L = structure.num_layers
    layers: list[LayerSpec] = []
    removed_proxies = []
    block_alpha = []
    for l, (spec, a) in enumerate(zip(structure.layers, alphas), 1):
        keys = spec.path_keys()
        if len(keys) != len(a):
            raise PruneError(f"layer {l} has {len(keys)} paths but {len(a)} attention values")
        weights = dict(zip(keys, a))
        keep = []
        for s in spec.proxies:
            if weights[f"proxy{s}"] < threshold:
                removed_proxies.append((l, s))
            else:
                keep.append(s)
        if spec.block:
            block_alpha.append((weights["block"], l))
        layers.append(LayerSpec(spec.block, keep))
    free_blocks = sorted(l for a, l in block_alpha if a < threshold)
    removed_blocks = sorted(set(free_blocks) | {l for _, l in sorted(block_alpha)[:drop_blocks]})
    for l in removed_blocks:
        layers[l - 1].block = False

    orphaned: list[str] = []
    rounds = 0
    while True:
        rounds += 1
        changed = False
        alive = [True] + [spec.alive for spec in layers]
        # paths reading a dead node go
        for l, spec in enumerate(layers, 1):
            if spec.block and not alive[l - 1]:
                spec.block = False
                orphaned.append(f"layer {l} block (input node {l - 1} dead)")
                changed = True
            dead_src = [s for s in spec.proxies if not alive[s]]
            for s in dead_src:
                spec.proxies.remove(s)
                orphaned.append(f"layer {l} proxy from node {s} (source dead)")
                changed = True
        # nodes nobody reads (except the last) go, with every path into them
        current = Structure(layers)
        for node in range(1, L):
            if layers[node - 1].alive and not current.readers(node):
                spec = layers[node - 1]
                orphaned += [f"layer {node} {k} (output unused)" for k in spec.path_keys()]
                spec.block, spec.proxies = False, []
                changed = True
        if not changed:
            break
    if not layers[-1].alive:
        return None
    return PruneResult(Structure(layers), removed_proxies, removed_blocks, free_blocks, orphaned, rounds)
