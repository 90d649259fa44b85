"""The NumPy port of DeepSeek EPLB reproduces the upstream README example and the anchors' computed numbers."""

from __future__ import annotations

import numpy as np
import pytest

from moe_runtime.scheduler.eplb import (
    balanced_packing,
    eplb_gpu_order,
    eplb_placement,
    rebalance_experts,
    replicate_experts,
)
from moe_runtime.scheduler.load import actor_loads

README_WEIGHT = np.array(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)
README_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


def gpu_loads(weight: np.ndarray, phy2log: np.ndarray, logcnt: np.ndarray, num_gpus: int) -> np.ndarray:
    """EPLB's own accounting: each physical replica carries weight / count."""
    per_phy = np.take_along_axis(weight / logcnt, phy2log, axis=-1)
    return per_phy.reshape(weight.shape[0], num_gpus, -1).sum(-1)


def test_readme_example_hierarchical():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert phy2log.tolist() == README_PHY2LOG
    loads = gpu_loads(README_WEIGHT, phy2log, logcnt, 8)
    assert loads[0].tolist() == [121.5, 86.5, 125.0, 113.0, 147.5, 131.5, 156.0, 152.0]
    imbalance = loads.max(1) / loads.mean(1)
    assert imbalance == pytest.approx([1.208, 1.242], abs=5e-4)
    # log2phy is the inverse of phy2log and logcnt counts the replicas.
    assert logcnt.sum(1).tolist() == [16, 16]
    for layer in range(2):
        for e in range(12):
            slots = [int(p) for p in log2phy[layer, e] if p >= 0]
            assert len(slots) == logcnt[layer, e]
            assert all(phy2log[layer, p] == e for p in slots)


def test_readme_input_global_policy_when_groups_do_not_divide_nodes():
    phy2log, _, logcnt = rebalance_experts(README_WEIGHT, 16, 3, 2, 8)
    loads = gpu_loads(README_WEIGHT, phy2log, logcnt, 8)
    assert loads.max(1) / loads.mean(1) == pytest.approx([1.073, 1.190], abs=5e-4)
    # EPLB has no anti-affinity: both copies of expert 1 land on GPU 7 (slots 14 and 15).
    assert phy2log[0, 14] == phy2log[0, 15] == 1


def test_flashlb_case_max_gpu_load_232():
    weight = np.array([[600, 560, 120, 120, 20, 10, 10, 10]])
    phy2log, _, logcnt = rebalance_experts(weight, 16, 1, 1, 8)
    loads = gpu_loads(weight, phy2log, logcnt, 8)
    assert loads.max() == 232.0
    assert loads.max() / loads.mean() == pytest.approx(1.28, abs=5e-3)


def test_balanced_packing_fills_every_pack_exactly_and_breaks_ties_by_index():
    w = np.array([[5.0, 5.0, 5.0, 5.0, 1.0, 1.0]])
    pack, rank = balanced_packing(w, 3)
    assert np.bincount(pack[0], minlength=3).tolist() == [2, 2, 2]
    # Items 0..3 (ties) go to packs 0, 1, 2, then item 3 to the lightest open pack with the lowest index (0).
    assert pack[0].tolist() == [0, 1, 2, 0, 1, 2]
    assert rank[0].tolist() == [0, 0, 0, 1, 1, 1]
    ident, zero = balanced_packing(np.array([[3.0, 1.0, 2.0]]), 3)
    assert ident.tolist() == [[0, 1, 2]] and zero.tolist() == [[0, 0, 0]]
    with pytest.raises(ValueError, match="do not split evenly"):
        balanced_packing(np.ones((1, 5)), 2)


def test_replicate_experts_takes_first_argmax_on_ties():
    phy2log, rank, logcnt = replicate_experts(np.array([[4.0, 4.0, 1.0]]), 5)
    # First extra replica: tie 4/1 vs 4/1 -> expert 0; second: 4/1 (expert 1) > 4/2 -> expert 1.
    assert phy2log.tolist() == [[0, 1, 2, 0, 1]]
    assert rank.tolist() == [[0, 0, 0, 1, 1]]
    assert logcnt.tolist() == [[2, 2, 1]]


def test_eplb_placement_merges_duplicate_replicas_on_one_actor():
    weight = np.array([[600, 560, 120, 120, 20, 10, 10, 10]])
    phy2log, _, _ = rebalance_experts(weight, 16, 1, 1, 8)
    assert phy2log[0, 14] == phy2log[0, 15]  # two copies of one expert on GPU 7
    dup = int(phy2log[0, 14])
    placement = eplb_placement(weight, num_actors=8, slots_per_actor=2)
    assert 7 in placement.replicas[0][dup]
    assert len(placement.replicas[0][dup]) == int((phy2log[0] == dup).sum()) - 1
    # Every expert is placed and no actor exceeds its slots.
    used = np.zeros(8, dtype=int)
    for actors in placement.replicas[0]:
        assert actors
        for a in actors:
            used[a] += 1
    assert used.max() <= 2


def test_eplb_placement_maps_gpus_node_major_onto_actors():
    # Actors interleaved over two nodes: EPLB GPUs 0-3 (node 0) must be actors 0, 2, 4, 6.
    nodes = (0, 1, 0, 1, 0, 1, 0, 1)
    order, num_nodes = eplb_gpu_order(8, nodes)
    assert order == [0, 2, 4, 6, 1, 3, 5, 7] and num_nodes == 2
    placement = eplb_placement(README_WEIGHT, 8, 2, nodes, num_groups=4)
    phy2log, _, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    ours = actor_loads(README_WEIGHT, placement)
    theirs = gpu_loads(README_WEIGHT, phy2log, logcnt, 8)
    # No duplicates in this plan, so per-actor loads are EPLB's per-GPU loads, permuted by `order`.
    np.testing.assert_allclose(ours[:, order], theirs)
    assert placement.actor_nodes == nodes
    # Uneven nodes: the hierarchy does not apply.
    assert eplb_gpu_order(3, (0, 0, 1))[1] == 1


def test_eplb_placement_rejects_too_few_slots():
    with pytest.raises(ValueError, match="< 12 experts"):
        eplb_placement(README_WEIGHT, num_actors=2, slots_per_actor=5)
