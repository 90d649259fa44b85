"""benchmarks/rebalance_recorded.py: the replay re-plans on schedule and scores plans on later steps only."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import rebalance_recorded as rec
from moe_runtime.placement import Placement
from moe_runtime.scheduler.load import balancedness

STEPS, LAYERS, EXPERTS, ACTORS, EVERY, BYTES = 7, 2, 8, 4, 2, 1000


@pytest.fixture(scope="module")
def loads() -> np.ndarray:
    rng = np.random.default_rng(0)
    p = np.arange(1, EXPERTS + 1, dtype=np.float64) ** -1.2
    return np.stack(
        [np.stack([rng.multinomial(4096, p / p.sum()) for _ in range(LAYERS)]) for _ in range(STEPS)]
    ).astype(np.float64)


def test_replay_schedule_and_scoring(loads):
    r = rec.replay(loads, ACTORS, EVERY, 0.8, BYTES)
    # plans after steps 1, 3, 5 (never after the last step); scored: every step after the first plan
    assert r["decisions"] == 3 and r["scored_steps"] == STEPS - EVERY
    static = Placement.contiguous(LAYERS, EXPERTS, ACTORS, (0,) * ACTORS)
    expected_static = np.mean([balancedness(loads[t], static) for t in range(EVERY, STEPS)])
    assert r["balancedness_static"] == pytest.approx(expected_static)
    assert r["ours_changed"] >= 1 and r["balancedness_ours"] > r["balancedness_static"]
    assert r["slots_per_actor"] == EXPERTS // ACTORS + 1
    for side in ("ours", "eplb_aligned", "eplb_raw"):
        assert r[f"bytes_{side}"] == r[f"copies_{side}"] * BYTES
    assert r["copies_eplb_aligned"] <= r["copies_eplb_raw"]


def test_headline_means_and_sums():
    rows = [
        {"balancedness_static": 0.5, "balancedness_ours": 0.9, "balancedness_eplb": 0.8,
         "copies_ours": 1, "copies_eplb_aligned": 4, "copies_eplb_raw": 8},
        {"balancedness_static": 0.7, "balancedness_ours": None, "balancedness_eplb": 0.6,
         "copies_ours": 3, "copies_eplb_aligned": 4, "copies_eplb_raw": 8},
    ]  # fmt: skip
    h = rec.headline({"per_actors": rows})
    assert h["balancedness_static"] == pytest.approx(0.6) and h["balancedness_eplb"] == pytest.approx(0.7)
    assert h["balancedness_ours"] == pytest.approx(0.9)  # a case without scored steps is left out
    assert h["bytes_moved_ours_vs_eplb"] == pytest.approx(4 / 8)
    assert h["bytes_moved_ours_vs_eplb_raw"] == pytest.approx(4 / 16)
