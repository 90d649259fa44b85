"""The torch port of DeepSeek EPLB gives upstream's exact outputs.

Upstream cannot be installed as a package, so its code is copied below, verbatim, as the reference; the port is
compared with it on seeded random loads full of ties (rows longer than 16 items, where torch's unstable sort
no longer keeps index order), and checked against hand-fixed arrays, the README example and the anchors'
computed numbers, so the test does not only compare two codes. The hand-fixed tie orders are those of torch's
CPU sort in the pinned torch (pyproject.toml); upstream's outputs depend on them.
"""

from __future__ import annotations

import pathlib
import types

import numpy as np
import pytest
import torch

from moe_runtime.scheduler.eplb import (
    balanced_packing,
    eplb_gpu_order,
    eplb_placement,
    rebalance_experts,
    replicate_experts,
)
from moe_runtime.scheduler.load import actor_loads

# ------------------------------------------------------------------------------------------ upstream reference
# deepseek-ai/EPLB eplb.py, lines 1-162, verbatim (trailing spaces included) in data/upstream_eplb.py.txt:
# https://github.com/deepseek-ai/EPLB/blob/57919718be1fbe2baca80a42a7df4de7119aaa95/eplb.py
# (commit 57919718be1fbe2baca80a42a7df4de7119aaa95; these lines are those of main @ d52c72d, 2025-03-24, whose
# README example is tested below). Left out: rebalance_with_migration_cost and __all__ (not ported).
#
# MIT License
#
# Copyright (c) 2025 DeepSeek
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to deal
# in the Software without restriction, including without limitation the rights
# to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
# copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all
# copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
# SOFTWARE.
UPSTREAM_EPLB_PY = (pathlib.Path(__file__).parent / "data" / "upstream_eplb.py.txt").read_text()  # verbatim
upstream = types.ModuleType("upstream_eplb")
exec(compile(UPSTREAM_EPLB_PY, "deepseek-ai/EPLB/eplb.py", "exec"), upstream.__dict__)

# ---------------------------------------------------------------------------------------------------- fixtures

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
# 32 experts, loads 1..5: every load is shared by 5-8 experts.
TIED_32 = [5, 3, 3, 1, 4, 4, 2, 2, 3, 3, 5, 1, 2, 2, 4, 4, 1, 1, 3, 3, 5, 5, 2, 2, 4, 1, 3, 2, 5, 3, 1, 4]


def gpu_loads(weight: np.ndarray, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> np.ndarray:
    """EPLB's own accounting: each physical replica carries weight / count."""
    per_phy = np.take_along_axis(weight / logcnt.numpy(), phy2log.numpy(), axis=-1)
    return per_phy.reshape(weight.shape[0], num_gpus, -1).sum(-1)


def assert_same_as_upstream(weight: torch.Tensor, *args: int) -> None:
    ours = rebalance_experts(weight, *args)
    theirs = upstream.rebalance_experts(weight, *args)
    for name, a, b in zip(("phy2log", "log2phy", "logcnt"), ours, theirs):
        assert a.dtype == b.dtype == torch.int64, (name, args)
        assert torch.equal(a, b), f"{name} differs from upstream for {args} on weight {weight.tolist()}"


# --------------------------------------------------------------------------------------- upstream's examples


def test_readme_example_hierarchical():
    phy2log, log2phy, logcnt = rebalance_experts(torch.from_numpy(README_WEIGHT), 16, 4, 2, 8)
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
    # The copied upstream code prints the README's output too, and the port matches all three outputs.
    assert upstream.rebalance_experts(torch.from_numpy(README_WEIGHT), 16, 4, 2, 8)[0].tolist() == README_PHY2LOG
    assert_same_as_upstream(torch.from_numpy(README_WEIGHT), 16, 4, 2, 8)


def test_readme_input_global_policy_when_groups_do_not_divide_nodes():
    phy2log, _, logcnt = rebalance_experts(torch.from_numpy(README_WEIGHT), 16, 3, 2, 8)
    loads = gpu_loads(README_WEIGHT, phy2log, logcnt, 8)
    assert loads.max(1) / loads.mean(1) == pytest.approx([1.073, 1.190], abs=5e-4)
    # EPLB has no anti-affinity: both copies of expert 1 land on GPU 7 (slots 14 and 15).
    assert phy2log[0, 14] == phy2log[0, 15] == 1


def test_flashlb_case_max_gpu_load_232():
    weight = np.array([[600, 560, 120, 120, 20, 10, 10, 10]])
    phy2log, _, logcnt = rebalance_experts(torch.from_numpy(weight), 16, 1, 1, 8)
    loads = gpu_loads(weight, phy2log, logcnt, 8)
    assert loads.max() == 232.0
    assert loads.max() / loads.mean() == pytest.approx(1.28, abs=5e-3)


# ------------------------------------------------------------------------------- ties, by hand and by the copy


def test_balanced_packing_fills_every_pack_exactly_and_breaks_ties_by_index_on_short_rows():
    w = torch.tensor([[5.0, 5.0, 5.0, 5.0, 1.0, 1.0]])
    pack, rank = balanced_packing(w, 3)
    assert torch.bincount(pack[0], minlength=3).tolist() == [2, 2, 2]
    # Items 0..3 (ties) go to packs 0, 1, 2, then item 3 to the lightest open pack with the lowest index (0).
    # Torch's sort keeps index order on rows of up to 16 items, so this is upstream's answer too.
    assert pack[0].tolist() == [0, 1, 2, 0, 1, 2]
    assert rank[0].tolist() == [0, 0, 0, 1, 1, 1]
    ident, zero = balanced_packing(torch.tensor([[3.0, 1.0, 2.0]]), 3)
    assert ident.tolist() == [[0, 1, 2]] and zero.tolist() == [[0, 0, 0]]
    with pytest.raises(ValueError, match="do not split evenly"):
        balanced_packing(torch.ones((1, 5)), 2)


def test_balanced_packing_orders_ties_as_torch_sort_on_rows_longer_than_16():
    row = [3.0] * 8 + [2.0] * 8 + [1.0] * 4
    # Torch's default descending sort on 20 items does not keep index order inside a tie:
    order = torch.tensor(row).sort(-1, descending=True).indices.tolist()
    assert order == [1, 2, 3, 4, 5, 6, 7, 0, 10, 15, 14, 13, 12, 11, 9, 8, 16, 17, 18, 19]
    # Greedy over that order, 4 packs of 5: each run of 4 equal items sees 4 equal packs, so it goes to packs
    # 0, 1, 2, 3 in order: 1 2 3 4 | 5 6 7 0 | 10 15 14 13 | 12 11 9 8 | 16 17 18 19. Item 0 lands in pack 3
    # (a stable sort would put it in pack 0).
    pack, rank = balanced_packing(torch.tensor([row]), 4)
    assert pack.tolist() == [[3, 0, 1, 2, 3, 0, 1, 2, 3, 2, 0, 1, 0, 3, 2, 1, 0, 1, 2, 3]]
    assert rank.tolist() == [[1, 0, 0, 0, 0, 1, 1, 1, 3, 3, 2, 3, 3, 2, 2, 2, 4, 4, 4, 4]]
    theirs = upstream.balanced_packing(torch.tensor([row]), 4)
    assert torch.equal(pack, theirs[0]) and torch.equal(rank, theirs[1])


def test_replicate_experts_takes_first_argmax_on_ties():
    phy2log, rank, logcnt = replicate_experts(torch.tensor([[4.0, 4.0, 1.0]]), 5)
    # First extra replica: tie 4/1 vs 4/1 -> expert 0; second: 4/1 (expert 1) > 4/2 -> expert 1.
    assert phy2log.tolist() == [[0, 1, 2, 0, 1]]
    assert rank.tolist() == [[0, 0, 0, 1, 1]]
    assert logcnt.tolist() == [[2, 2, 1]]
    # 20 equal experts, 4 extra replicas: the first maxima are experts 0, 1, 2, 3.
    phy2log, rank, logcnt = replicate_experts(torch.full((1, 20), 4.0), 24)
    assert phy2log[0, 20:].tolist() == [0, 1, 2, 3] and rank[0, 20:].tolist() == [1, 1, 1, 1]
    assert logcnt[0].tolist() == [2] * 4 + [1] * 16


@pytest.mark.parametrize(
    ("num_replicas", "num_groups", "num_nodes", "num_gpus", "phy2log", "log2phy_first"),
    [
        (  # hierarchical: each node packs 20 replicas with ties onto 4 GPUs
            40, 4, 2, 8,
            [31, 28, 5, 7, 5, 24, 0, 6, 4, 25, 1, 26, 0, 27, 3, 29, 2, 28, 4, 30,
             15, 21, 12, 22, 16, 9, 8, 21, 23, 17, 19, 10, 10, 13, 14, 18, 20, 20, 14, 11],
            [6, 12],
        ),
        (  # global (1 group, 2 nodes): 40 replicas with ties onto 8 GPUs
            40, 1, 2, 8,
            [15, 20, 14, 13, 30, 24, 28, 22, 27, 3, 31, 21, 23, 12, 17, 19, 8, 0, 4, 11,
             18, 2, 20, 7, 25, 26, 1, 10, 6, 16, 29, 0, 28, 14, 5, 9, 10, 21, 5, 4],
            [17, 31],
        ),
        (  # no redundancy: 32 tied experts onto 4 GPUs
            32, 1, 1, 4,
            [0, 20, 1, 29, 9, 22, 6, 30, 28, 31, 24, 26, 8, 23, 16, 11,
             21, 4, 14, 19, 2, 7, 17, 25, 10, 5, 15, 18, 13, 12, 27, 3],
            [0],
        ),
    ],
)
def test_rebalance_experts_matches_upstream_on_32_tied_experts(
    num_replicas, num_groups, num_nodes, num_gpus, phy2log, log2phy_first
):
    weight = torch.tensor([TIED_32])
    got_phy2log, log2phy, logcnt = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    assert got_phy2log.tolist() == [phy2log]
    assert log2phy[0, 0].tolist() == log2phy_first
    # logcnt and log2phy follow from phy2log: count each expert's slots; list them by replica rank.
    assert logcnt.tolist() == [np.bincount(phy2log, minlength=32).tolist()]
    for e in range(32):
        slots = [p for p in log2phy[0, e].tolist() if p >= 0]
        assert sorted(slots) == [p for p, x in enumerate(phy2log) if x == e]
    assert_same_as_upstream(weight, num_replicas, num_groups, num_nodes, num_gpus)


def test_rebalance_experts_matches_upstream_on_random_tied_loads():
    # The same code with a stable sort (the port's old tie rule) stands in for a port that gets ties wrong.
    stable = types.ModuleType("upstream_eplb_stable_sort")
    stable_src = UPSTREAM_EPLB_PY.replace(".sort(-1, descending=True)", ".sort(stable=True, dim=-1, descending=True)")
    exec(compile(stable_src, "eplb_stable_sort.py", "exec"), stable.__dict__)
    rng = np.random.default_rng(12)
    policies = {"hierarchical": 0, "global": 0}
    stable_differs = 0
    for case in range(150):
        num_experts = int(rng.choice([32, 40, 48, 64]))
        num_groups = int(rng.choice([g for g in (1, 2, 4, 8, 16) if num_experts % g == 0]))
        num_nodes = int(rng.choice([1, 2, 4]))
        num_gpus = num_nodes * int(rng.choice([1, 2, 4]))
        min_per_gpu = -(-num_experts // num_gpus)
        num_replicas = num_gpus * int(rng.integers(min_per_gpu, min_per_gpu + 3))
        # Integer loads from a small range (ties everywhere), given as int64, float32 or float64 halves.
        loads = rng.integers(0, int(rng.choice([2, 3, 5, 8])), size=(int(rng.integers(1, 4)), num_experts))
        weight = (torch.from_numpy(loads), torch.from_numpy(loads).float(), torch.from_numpy(loads / 2.0))[case % 3]
        args = (num_replicas, num_groups, num_nodes, num_gpus)
        assert_same_as_upstream(weight, *args)
        policies["hierarchical" if num_groups % num_nodes == 0 else "global"] += 1
        stable_differs += not torch.equal(stable.rebalance_experts(weight, *args)[0], rebalance_experts(weight, *args)[0])
    assert min(policies.values()) >= 30, policies
    assert stable_differs >= 75, stable_differs


# ---------------------------------------------------------------------------------------------- to Placement


def test_eplb_placement_merges_duplicate_replicas_on_one_actor():
    weight = np.array([[600, 560, 120, 120, 20, 10, 10, 10]])
    phy2log, _, _ = rebalance_experts(torch.from_numpy(weight), 16, 1, 1, 8)
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
    phy2log, _, logcnt = rebalance_experts(torch.from_numpy(README_WEIGHT), 16, 4, 2, 8)
    ours = actor_loads(README_WEIGHT, placement)
    theirs = gpu_loads(README_WEIGHT, phy2log, logcnt, 8)
    # No duplicates in this plan, so per-actor loads are EPLB's per-GPU loads, permuted by `order`.
    np.testing.assert_allclose(ours[:, order], theirs)
    assert placement.actor_nodes == nodes
    # Uneven nodes: the hierarchy does not apply.
    assert eplb_gpu_order(3, (0, 0, 1))[1] == 1


def test_eplb_placement_follows_upstream_phy2log_on_tied_loads():
    # 32 tied experts, 8 actors of 5 slots on 2 nodes, 1 group (global policy): upstream's phy2log, GPU by GPU.
    weight = np.array([TIED_32])
    placement = eplb_placement(weight, num_actors=8, slots_per_actor=5, actor_nodes=(0,) * 4 + (1,) * 4)
    phy2log = upstream.rebalance_experts(torch.from_numpy(weight), 40, 1, 2, 8)[0][0].tolist()
    expected = [sorted({slot // 5 for slot, x in enumerate(phy2log) if x == e}) for e in range(32)]
    assert [list(r) for r in placement.replicas[0]] == expected


def test_eplb_placement_rejects_too_few_slots():
    with pytest.raises(ValueError, match="< 12 experts"):
        eplb_placement(README_WEIGHT, num_actors=2, slots_per_actor=5)
