"""Pruning: threshold, K lowest blocks, orphans to a fixpoint, the classifier never disconnected."""
from __future__ import annotations

import pytest

from tailor_cli.pruning import PruneError, plan
from tailor_cli.student import Structure


def _uniform_alphas(structure, block=0.9):
    out = []
    for spec in structure.layers:
        n = len(spec.proxies)
        out.append(([block] if spec.block else []) + [(1 - block) / max(n, 1)] * n)
    return out


def test_threshold_removes_the_proxies_under_it():
    s = Structure.full(4, 2)
    alphas = [[0.9, 0.1], [0.8, 0.15, 0.05], [0.7, 0.01, 0.29], [0.5, 0.3, 0.2]]
    res = plan(s, alphas, threshold=0.1, drop_blocks=0)
    assert res.removed_proxies == [(2, 0), (3, 2)]
    assert res.structure.layers[0].proxies == [0]  # 0.1 is not < 0.1
    assert res.structure.layers[2].proxies == [1]
    assert all(spec.block for spec in res.structure.layers)


def test_blocks_the_attention_left_are_pruned_for_free_and_count_towards_k():
    s = Structure.full(4, 1)
    alphas = [[0.9, 0.1], [0.01, 0.99], [0.8, 0.2], [0.3, 0.7]]  # layer 2's block is under the threshold
    res = plan(s, alphas, threshold=0.05, drop_blocks=0)
    assert res.free_blocks == [2] and res.removed_blocks == [2]
    assert [spec.block for spec in res.structure.layers] == [True, False, True, True]
    # K = 1 names the same (lowest) block: still one block removed, not two
    assert plan(s, alphas, threshold=0.05, drop_blocks=1).removed_blocks == [2]
    # K = 2 adds the next lowest
    assert plan(s, alphas, threshold=0.05, drop_blocks=2).removed_blocks == [2, 4]
    # threshold 0 keeps the paper's rule (no free block)
    assert plan(s, alphas, threshold=0.0, drop_blocks=0).removed_blocks == []


def test_drop_blocks_removes_the_k_lowest_attention_blocks():
    s = Structure.full(5, 1)
    alphas = [[0.9, 0.1], [0.3, 0.7], [0.8, 0.2], [0.2, 0.8], [0.6, 0.4]]
    res = plan(s, alphas, threshold=0.0, drop_blocks=2)
    assert res.removed_blocks == [2, 4]
    assert [spec.block for spec in res.structure.layers] == [True, False, True, False, True]
    assert res.structure.layers[1].proxies == [1]  # layer 2 survives through its proxy from node 1


def test_orphans_are_removed_to_a_fixpoint():
    # Layer 2 loses every input (its block is the lowest, its proxies are under the threshold),
    # so node 2 dies; layer 3 then loses its block and proxy from node 2 and its other proxies
    # are under the threshold, so node 3 dies in a second round; layer 4 keeps only its long
    # skip from node 1.
    s = Structure.full(4, 3)
    alphas = [
        [0.9, 0.1],  # layer 1 <- block(0), p0
        [0.1, 0.01, 0.01],  # layer 2 <- block(1), p1, p0
        [0.9, 0.05, 0.01, 0.04],  # layer 3 <- block(2), p2, p1, p0
        [0.5, 0.2, 0.2, 0.1],  # layer 4 <- block(3), p3, p2, p1
    ]
    res = plan(s, alphas, threshold=0.06, drop_blocks=1)
    layers = res.structure.layers
    assert res.removed_blocks == [2]
    assert not layers[1].alive and not layers[2].alive
    assert layers[3].block is False and layers[3].proxies == [1]
    assert layers[0].alive
    assert res.rounds >= 2
    assert any("layer 3 block" in o for o in res.orphaned)


def test_a_node_nobody_reads_is_removed_with_its_inputs():
    s = Structure.full(3, 2)  # layer 3 <- block(2), p2, p1
    alphas = [[0.9, 0.1], [0.9, 0.05, 0.05], [0.1, 0.01, 0.89]]
    res = plan(s, alphas, threshold=0.02, drop_blocks=1)
    layers = res.structure.layers
    assert res.removed_blocks == [3]
    assert not layers[1].alive  # node 2's output is unused: its block and proxies go
    assert layers[2].proxies == [1] and layers[0].alive
    assert any("output unused" in o for o in res.orphaned)


def test_fixpoint_result_has_no_dangling_paths():
    s = Structure.full(6, 3)
    alphas = [
        [0.9, 0.1], [0.2, 0.4, 0.4], [0.9, 0.04, 0.03, 0.03],
        [0.1, 0.3, 0.3, 0.3], [0.9, 0.04, 0.03, 0.03], [0.6, 0.2, 0.1, 0.1],
    ]
    res = plan(s, alphas, threshold=0.05, drop_blocks=2)
    st = res.structure
    alive = [True] + [spec.alive for spec in st.layers]
    for l, spec in enumerate(st.layers, 1):
        if spec.block:
            assert alive[l - 1]
        assert all(alive[src] for src in spec.proxies)
        if spec.alive and l < st.num_layers:
            assert st.readers(l), f"node {l} alive but unread"
    assert st.layers[-1].alive


def test_disconnecting_the_classifier_is_refused():
    s = Structure.full(3, 1)
    alphas = [[0.9, 0.1], [0.9, 0.1], [0.2, 0.01]]  # last layer: block dropped, proxy under threshold
    with pytest.raises(PruneError, match="disconnects the classifier") as info:
        plan(s, alphas, threshold=0.05, drop_blocks=1)
    # the message names values that work, and each of them does
    assert "--drop-blocks 0 is the most that keeps it connected" in str(info.value)
    assert "with --drop-blocks 1, --threshold 0.01 or lower does" in str(info.value)
    assert "prune --auto" in str(info.value)
    plan(s, alphas, threshold=0.05, drop_blocks=0)
    plan(s, alphas, threshold=0.01, drop_blocks=1)


def test_a_disconnect_no_threshold_can_mend_says_so():
    s = Structure.full(3, 1)
    alphas = [[0.6, 0.4], [0.6, 0.4], [0.6, 0.4]]
    s.layers[2].proxies = []  # the last layer has only its block: dropping every block disconnects
    alphas[2] = [0.6]
    with pytest.raises(PruneError) as info:
        plan(s, alphas, threshold=0.05, drop_blocks=3)
    assert "--drop-blocks 2 is the most" in str(info.value)
    assert "no threshold keeps it connected with --drop-blocks 3" in str(info.value)


@pytest.mark.parametrize("threshold,k,msg", [(-0.1, 0, "threshold"), (1.0, 0, "threshold"), (0.05, 5, "drop-blocks"),
                                             (0.05, -1, "drop-blocks")])
def test_arguments_out_of_range(threshold, k, msg):
    s = Structure.full(4, 1)
    with pytest.raises(PruneError, match=msg):
        plan(s, _uniform_alphas(s), threshold=threshold, drop_blocks=k)


def test_dropping_every_block_keeps_a_proxy_chain():
    s = Structure.full(3, 1)
    alphas = [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
    res = plan(s, alphas, threshold=0.05, drop_blocks=3)
    assert [spec.block for spec in res.structure.layers] == [False] * 3
    assert [spec.proxies for spec in res.structure.layers] == [[0], [1], [2]]
