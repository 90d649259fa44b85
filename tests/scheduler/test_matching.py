"""Relabelling actors for maximum overlap: the Hungarian matching and align_actors."""

from __future__ import annotations

import itertools

import numpy as np

from moe_runtime.placement import Placement
from moe_runtime.scheduler.matching import align_actors, hungarian
from moe_runtime.scheduler.policy import bytes_moved


def test_hungarian_is_a_minimum_cost_matching():
    rng = np.random.default_rng(4)
    for n in (1, 2, 3, 5, 6):
        for _ in range(10):
            cost = rng.integers(0, 5, (n, n)).astype(float)  # small integers: many ties
            col = hungarian(cost)
            assert sorted(col) == list(range(n))
            best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
            assert sum(cost[i, col[i]] for i in range(n)) == best


def test_align_actors_finds_the_maximum_overlap():
    rng = np.random.default_rng(5)
    for _ in range(20):
        A, E = 5, 10
        old = Placement(A, (tuple((int(rng.integers(A)),) for _ in range(E)),))
        new = Placement(A, (tuple((int(rng.integers(A)),) for _ in range(E)),))
        aligned = align_actors(new, old)
        best = min(
            bytes_moved(old, Placement(A, (tuple((perm[a[0]],) for a in new.replicas[0]),)), 1)
            for perm in itertools.permutations(range(A))
        )
        assert bytes_moved(old, aligned, 1) == best
        # Relabelling keeps the multiset of per-actor expert sets.
        assert sorted(map(sorted, (aligned.shards_of(a) for a in range(A)))) == sorted(
            map(sorted, (new.shards_of(a) for a in range(A)))
        )
