"""Local search over replica changes: polish and prune on one layer, the budgeted search over layers."""

from __future__ import annotations

import numpy as np

from moe_runtime.scheduler.layer import LayerState, SlotLimits, objective
from moe_runtime.scheduler.search import local_search, polish, prune


def _layer(rng: np.random.Generator, E: int = 8, A: int = 4) -> LayerState:
    w = rng.uniform(0, 100, E) ** 2
    hosts = [[int(rng.integers(A))] for _ in range(E)]
    return LayerState(w, hosts, A, [frozenset(h) for h in hosts])


def _feasible(layer: LayerState, slots: int) -> bool:
    return all(layer.used(a) <= slots for a in range(layer.num_actors)) and all(layer.hosts)


def test_polish_lowers_the_max_and_prune_saves_copies_without_raising_it():
    rng = np.random.default_rng(0)
    for _ in range(30):
        layer = _layer(rng)
        before = layer.max
        lim = SlotLimits([4] * 4, 4, None)
        polish(layer, lim, 32)
        assert layer.max <= before * (1 + 1e-12) and _feasible(layer, 4)
        polished, copies = layer.max, layer.copies
        prune(layer, lim)
        assert layer.max <= polished * (1 + 1e-12) and layer.copies <= copies and _feasible(layer, 4)


def test_local_search_keeps_to_the_budget_and_never_worsens_the_objective():
    rng = np.random.default_rng(1)
    for budget in (0, 1, 3, None):
        layers = [_layer(rng) for _ in range(3)]
        start = objective(layers, 0.01)
        out = local_search([l.copy() for l in layers], 4, 4, None, 0.01, budget, 100)
        assert objective(out, 0.01) <= start * (1 + 1e-12)
        if budget is not None:
            assert sum(l.copies for l in out) <= budget
        assert all(_feasible(l, 4) for l in out)


def test_local_search_keeps_to_the_memory_limit():
    rng = np.random.default_rng(2)
    layers = [_layer(rng) for _ in range(3)]
    limit = max(sum(l.used(a) for l in layers) for a in range(4)) + 1
    out = local_search([l.copy() for l in layers], 4, 4, limit, 0.0, None, 200)
    assert all(sum(l.used(a) for l in out) <= limit for a in range(4))
