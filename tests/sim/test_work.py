"""The engine's replica split against the runtime's rule (placement.split_over_replicas)."""

from __future__ import annotations

import numpy as np

from moe_runtime.placement import split_over_replicas
from moe_runtime.sim.work import ReplicaSlots, split_rows


def test_split_rows_is_split_over_replicas():
    rng = np.random.default_rng(2)
    for _ in range(20):
        E, A, W = 8, 5, 6
        row = tuple(tuple(int(a) for a in rng.choice(A, size=rng.integers(1, 4), replace=False)) for _ in range(E))
        counts = rng.integers(0, 50, size=(W, E))
        slots = ReplicaSlots.of(row)
        rows = split_rows(counts, slots)
        for w in range(W):
            want = {(a, e): c for a, e, c in split_over_replicas(counts[w].tolist(), row)}
            got = {(int(a), int(e)): int(c) for a, e, c in zip(slots.actor, slots.expert, rows[w]) if c}
            assert got == want
