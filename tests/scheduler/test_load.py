"""Load snapshots, balance metrics and the EMA tracker."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from moe_runtime.config import SchedulerConfig
from moe_runtime.placement import Placement
from moe_runtime.scheduler.load import LoadSnapshot, LoadTracker, actor_loads, balancedness, imbalance


def test_actor_loads_split_replicated_experts_evenly():
    # 1 layer, 3 experts, 2 actors; expert 0 replicated on both.
    placement = Placement(2, (((0, 1), (0,), (1,)),))
    tokens = np.array([[10.0, 4.0, 2.0]])
    np.testing.assert_allclose(actor_loads(tokens, placement), [[9.0, 7.0]])
    assert imbalance(tokens, placement) == pytest.approx(9.0 / 8.0)
    assert balancedness(tokens, placement) == pytest.approx(8.0 / 9.0)


def test_imbalance_sums_over_layers_and_reports_per_layer():
    placement = Placement.contiguous(2, 2, 2)  # expert e on actor e
    snap = LoadSnapshot(3, [[3.0, 1.0], [2.0, 2.0]])
    # sum of max = 3 + 2 = 5, sum of mean = 2 + 2 = 4.
    assert snap.imbalance(placement) == pytest.approx(5 / 4)
    assert snap.balancedness(placement) == pytest.approx(4 / 5)
    np.testing.assert_allclose(snap.imbalance_per_layer(placement), [1.5, 1.0])
    np.testing.assert_allclose(snap.balancedness_per_layer(placement), [2 / 3, 1.0])


def test_no_tokens_is_perfectly_balanced():
    placement = Placement.contiguous(2, 4, 2)
    snap = LoadSnapshot(0, np.zeros((2, 4)))
    assert snap.imbalance(placement) == 1.0 and snap.balancedness(placement) == 1.0
    np.testing.assert_allclose(snap.imbalance_per_layer(placement), [1.0, 1.0])


def test_snapshot_is_immutable_and_copies_its_input():
    source = np.array([[1.0, 2.0], [3.0, 4.0]])
    snap = LoadSnapshot(7, source)
    source[0, 0] = 100.0
    assert snap.tokens[0, 0] == 1.0
    with pytest.raises(ValueError, match="read-only"):
        snap.tokens[0, 0] = 5.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.step = 8  # type: ignore[misc]
    assert snap == LoadSnapshot(7, [[1.0, 2.0], [3.0, 4.0]])
    assert hash(snap) == hash(LoadSnapshot(7, [[1.0, 2.0], [3.0, 4.0]]))
    assert snap != LoadSnapshot(8, [[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize(
    ("tokens", "message"),
    [([1.0, 2.0], r"\[layers, experts\]"), ([[1.0, -1.0]], r"tokens\[0\]\[1\] = -1.0"), ([[np.nan]], "NaN")],
)
def test_snapshot_rejects_bad_tokens(tokens, message):
    with pytest.raises(ValueError, match=message):
        LoadSnapshot(0, tokens)


def test_actor_loads_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="does not match placement"):
        actor_loads(np.ones((1, 3)), Placement.contiguous(1, 4, 2))


def test_ema_math():
    tracker = LoadTracker(1, 2, decay=0.8)
    tracker.update(0, [[10.0, 0.0]])
    np.testing.assert_allclose(tracker.snapshot().tokens, [[10.0, 0.0]])  # first update: the counts
    tracker.update(1, [[0.0, 10.0]])
    np.testing.assert_allclose(tracker.snapshot().tokens, [[8.0, 2.0]])
    tracker.update(5, [[5.0, 5.0]])
    # 0.8 * [8, 2] + 0.2 * [5, 5] = [7.4, 2.6]
    snap = tracker.snapshot()
    np.testing.assert_allclose(snap.tokens, [[7.4, 2.6]])
    assert snap.step == 5
    # The snapshot does not change when the tracker moves on.
    tracker.update(6, [[0.0, 0.0]])
    np.testing.assert_allclose(snap.tokens, [[7.4, 2.6]])
    np.testing.assert_allclose(tracker.snapshot().tokens, [[5.92, 2.08]])


def test_tracker_from_config_and_validation():
    tracker = LoadTracker.from_config(SchedulerConfig(ema_decay=0.5), num_layers=2, num_experts=3)
    assert tracker.decay == 0.5
    with pytest.raises(ValueError, match="no update yet"):
        tracker.snapshot()
    tracker.update(3, np.ones((2, 3)))
    with pytest.raises(ValueError, match="greater than the last step"):
        tracker.update(3, np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"expected \(2, 3\)"):
        tracker.update(4, np.ones((3, 2)))
    with pytest.raises(ValueError, match="decay"):
        LoadTracker(1, 1, decay=1.0)


def test_jsonl_round_trip_replays_the_same_ema(tmp_path):
    rng = np.random.default_rng(0)
    tracker = LoadTracker(3, 5, decay=0.7)
    for step in range(0, 20, 2):
        tracker.update(step, rng.integers(0, 1000, (3, 5)))
    path = tmp_path / "load.jsonl"
    tracker.save_jsonl(path)
    lines = path.read_text().splitlines()
    assert len(lines) == 10
    assert json.loads(lines[0])["step"] == 0 and json.loads(lines[-1])["step"] == 18
    replay = LoadTracker.load_jsonl(path)
    assert replay.decay == 0.7
    assert replay.snapshot() == tracker.snapshot()
    assert [s for s, _ in replay.history] == [s for s, _ in tracker.history]
    # Replaying with another decay gives a different EMA from the same counts.
    other = LoadTracker.load_jsonl(path, decay=0.0)
    np.testing.assert_array_equal(other.snapshot().tokens, tracker.history[-1][1])


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"step": 0, "decay": 0.8, "counts": [[1, 2]]}\n{"step": 1, "counts": oops}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        LoadTracker.load_jsonl(path)
    path.write_text('{"step": 1, "counts": [[1, 2]]}\n{"step": 0, "counts": [[1, 2]]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: step 0"):
        LoadTracker.load_jsonl(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no load records"):
        LoadTracker.load_jsonl(path)
