"""Relabelling a placement's actors to keep most replicas where they are: a maximum-overlap assignment per layer
(the Hungarian method), as EPLB's maintainer suggests for its plans (EPLB issue #25)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moe_runtime.placement import Placement

__all__ = ["align_actors", "align_layer", "hungarian"]


def hungarian(cost: np.ndarray) -> list[int]:
    """Minimum-cost perfect matching of a square matrix: returns col[row]. O(n^3), first index on ties."""
    n = cost.shape[0]
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    p = np.zeros(n + 1, dtype=np.int64)  # p[j] = row matched to column j (1-based; 0 = none)
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    col = [0] * n
    for j in range(1, n + 1):
        col[p[j] - 1] = j - 1
    return col


def align_layer(
    new_row: Sequence[Sequence[int]], old_row: Sequence[Sequence[int]], num_actors: int
) -> list[list[int]]:
    """Relabel the actors of one layer of `new_row` to maximise replicas that stay where they are."""
    overlap = np.zeros((num_actors, num_actors))
    for new_actors, old_actors in zip(new_row, old_row):
        for g in new_actors:
            for a in old_actors:
                overlap[g, a] += 1.0
    perm = hungarian(-overlap)
    return [sorted(perm[g] for g in actors) for actors in new_row]


def align_actors(new: Placement, old: Placement) -> Placement:
    """`new` with its actors relabelled per layer (a maximum-overlap assignment) to keep most replicas where
    `old` has them. Per-actor loads are permuted, so balance is unchanged; bytes moved can only drop.
    Relabelling ignores nodes: it may move a whole actor's set to another node."""
    if new.num_actors != old.num_actors:
        raise ValueError(f"num_actors differ: {new.num_actors} vs {old.num_actors}")
    rows = tuple(
        tuple(tuple(a) for a in align_layer(new_row, old_row, new.num_actors))
        for new_row, old_row in zip(new.replicas, old.replicas)
    )
    return Placement(new.num_actors, rows, new.version, new.actor_nodes)
