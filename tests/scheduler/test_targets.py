"""Whole-layer targets: EPLB-greedy replica counts, LPT packing, and the option menu of a layer."""

from __future__ import annotations

import numpy as np

from moe_runtime.scheduler.layer import LayerState, SlotLimits
from moe_runtime.scheduler.targets import layer_targets, lpt_target, replica_counts


def test_replica_counts_give_each_extra_replica_to_the_largest_share():
    assert replica_counts(np.array([100.0, 10.0, 10.0, 10.0]), 6, 4) == [3, 1, 1, 1]
    assert replica_counts(np.array([100.0, 60.0]), 5, 2) == [2, 2]  # capped at max_rep
    assert replica_counts(np.array([5.0, 0.0, 0.0]), 9, 9) == [7, 1, 1]  # only loaded experts grow
    assert replica_counts(np.zeros(3), 9, 9) == [1, 1, 1]  # no load: no extra replicas


def test_lpt_target_respects_slots_and_keeps_replicas_in_place_under_the_bound():
    rng = np.random.default_rng(0)
    for _ in range(50):
        E, A = int(rng.integers(2, 10)), int(rng.integers(2, 5))
        w = rng.uniform(0, 100, E)
        cap = [-(-E // A) + 1] * A
        counts = replica_counts(w, sum(cap), A)
        orig = [frozenset({int(rng.integers(A))}) for _ in range(E)]
        nodes = sorted(int(n) for n in rng.integers(0, 2, A))
        for node_first in (True, False):
            hosts = lpt_target(w, counts, orig, cap, nodes, None, node_first)
            assert all(1 <= len(h) <= counts[e] and len(set(h)) == len(h) for e, h in enumerate(hosts))
            assert all(sum(a in h for h in hosts) <= cap[a] for a in range(A))
        # an infinite bound keeps every expert's first replica where it was
        kept = lpt_target(w, [1] * E, orig, [E] * A, nodes, np.inf, True)
        assert [frozenset(h) for h in kept] == orig


def test_layer_targets_are_feasible_and_include_a_no_worse_plan():
    rng = np.random.default_rng(1)
    E, A = 8, 4
    w = rng.uniform(0, 100, E) ** 2
    hosts = [[e * A // E] for e in range(E)]
    layer = LayerState(w, hosts, A, [frozenset(h) for h in hosts])
    lim = SlotLimits([3] * A, A, None)
    eplb_row = [[e % A] for e in range(E)]
    options = layer_targets(layer, lim, [0, 0, 1, 1], eplb_row, 4 * E)
    assert options
    for opt in options:
        assert all(sum(a in h for h in opt.hosts) <= 3 for a in range(A)) and all(opt.hosts)
        assert opt.copies == LayerState(w, opt.hosts, A, layer.orig).copies
    assert min(o.max for o in options) < layer.max
