"""Choosing whole-layer options under the byte budget and memory, and the EPLB floor."""

from __future__ import annotations

from moe_runtime.scheduler.knapsack import eplb_floor, knapsack
from moe_runtime.scheduler.layer import LayerState
from moe_runtime.scheduler.targets import LayerOption

W = [60.0, 20.0, 10.0, 10.0]
HOSTS = [[0], [0], [1], [1]]  # actor loads 80 / 20
ORIG = [frozenset(h) for h in HOSTS]
# two options: swapping experts 1 and 3 (two copies, no extra slot; 70 / 30) and a second replica of expert 0
# (one copy, one extra slot on actor 1; 50 / 50)
MOVE = LayerState(W, [[0], [1], [1], [0]], 2, ORIG)
SPLIT = LayerState(W, [[0, 1], [0], [1], [1]], 2, ORIG)


def _options() -> list[list[LayerOption]]:
    return [[LayerOption.of(MOVE), LayerOption.of(SPLIT)]]


def test_knapsack_takes_the_best_option_the_budget_allows():
    assert (SPLIT.copies, SPLIT.max, MOVE.copies, MOVE.max) == (1, 50.0, 2, 70.0)
    base = [LayerState(W, HOSTS, 2, ORIG)]
    assert knapsack(base, _options(), 0.0, None, None)[0].rows() == SPLIT.rows()
    assert knapsack(base, _options(), 0.0, 1, None)[0].rows() == SPLIT.rows()
    assert knapsack(base, _options(), 0.0, 0, None)[0].rows() == base[0].rows()  # no copy fits: unchanged
    # no free memory slot: only the swap fits
    assert knapsack(base, _options(), 0.0, None, 2)[0].rows() == MOVE.rows()
    # priced copies: the swap's 10 of gain no longer pays for its two copies (0.3 x mean 50 each)
    assert knapsack(base, _options(), 0.3, None, 2)[0].rows() == base[0].rows()


def test_eplb_floor_replaces_a_layer_above_eplb_by_its_cheapest_option_below():
    base = [LayerState(W, HOSTS, 2, ORIG)]
    out = eplb_floor(base, _options(), [55.0], None, None)
    assert out[0].rows() == SPLIT.rows()  # the only option at or below 55
    assert eplb_floor(base, _options(), [80.0], None, None)[0].rows() == base[0].rows()  # already at the floor
    assert eplb_floor(base, _options(), [55.0], 0, None)[0].rows() == base[0].rows()  # does not fit the budget
