"""The scheduler's controller on an in-memory fleet: it feeds the trigger, decides, migrates and measures
(tests/runtime/test_rebalance.py runs the same hook on a Ray cluster)."""

from __future__ import annotations

import numpy as np
import pytest

from moe_runtime.config import RuntimeConfig, SchedulerConfig
from moe_runtime.model.accounting import expert_state_bytes
from moe_runtime.placement import Placement, copies_between
from moe_runtime.scheduler.hook import SchedulerHook
from tests.scheduler.fakes import FakeFleet

L, E, A = 2, 8, 4  # the tiny preset's layers and experts, on 4 actors


def _hook(**sched) -> SchedulerHook:
    cfg = RuntimeConfig(scheduler=SchedulerConfig(**sched))
    assert (cfg.model.num_layers, cfg.model.num_experts) == (L, E)
    return SchedulerHook(cfg, measure_steps=2)


def _skewed() -> np.ndarray:
    load = np.full((L, E), 10.0)
    load[:, 0] = 200.0  # expert 0 (on actor 0) takes most tokens in every layer
    return load


def test_observe_rebalances_when_the_trigger_fires_and_measures_after():
    hook = _hook(enabled=True, every_steps=3, imbalance_threshold=1.1, min_gain=0.0)
    start = Placement.contiguous(L, E, A)
    fleet = FakeFleet(start)
    reports = [hook.observe(fleet, step, _skewed()) for step in range(3)]
    assert reports[:2] == [None, None] and reports[2] is not None
    assert hook.last_trigger.rebalance and hook.last_trigger.imbalance > 1.1
    assert fleet.placement.version == start.version + 1 and fleet.placement != start
    assert hook.rebalances == 1 and hook.bytes_moved == reports[2].bytes_moved > 0
    assert hook.last_decision.changed and hook.last_decision_str.startswith("v0->v1 changed")
    assert hook.measured_balancedness is None  # measured over the next measure_steps steps
    for step in (3, 4):
        assert hook.observe(fleet, step, _skewed()) is None  # not a trigger step (every 3: 2, 5, ...)
    tokens = 2 * _skewed()
    loads = np.array([[sum(tokens[l, e] / len(h) for e, h in enumerate(row) if a in h) for a in range(A)]
                      for l, row in enumerate(fleet.placement.replicas)])  # fmt: skip
    assert hook.measured_balancedness == pytest.approx(loads.mean(axis=1).sum() / loads.max(axis=1).sum())
    st = hook.status(fleet.placement)
    assert st["rebalances"] == 1 and st["measured_gain"] == pytest.approx(
        hook.measured_balancedness / hook.last_decision.balancedness_before - 1.0)
    assert st["predicted_gain"] > 0 and st["last_migration_s"] is not None


def test_disabled_or_balanced_never_moves():
    for hook, load in ((_hook(enabled=False, every_steps=1), _skewed()),
                       (_hook(enabled=True, every_steps=1, imbalance_threshold=1.1), np.full((L, E), 10.0))):
        fleet = FakeFleet(Placement.contiguous(L, E, A))
        assert all(hook.observe(fleet, s, load) is None for s in range(4))
        assert hook.rebalances == 0 and fleet.calls == []


def test_a_rollback_restarts_the_average():
    hook = _hook()
    fleet = FakeFleet(Placement.contiguous(L, E, A))
    for step in range(4):
        hook.observe(fleet, step, _skewed())
    hook.observe(fleet, 1, np.full((L, E), 3.0))  # a replayed step after a restore
    np.testing.assert_array_equal(hook.tracker.snapshot().tokens, np.full((L, E), 3.0))


def test_a_given_placement_is_applied_and_priced_with_expert_state_bytes():
    hook = _hook()
    start = Placement.contiguous(L, E, A)
    fleet = FakeFleet(start)
    hook.observe(fleet, 0, _skewed())
    rows = [list(row) for row in start.replicas]
    rows[0][0], rows[1][7] = (0, 1, 2), (0,)
    target = Placement(A, tuple(tuple(r) for r in rows))
    rep = hook.rebalance(fleet, target)
    d = hook.last_decision
    assert d.reason == "placement given" and d.changed
    assert d.bytes_to_move == copies_between(start, target) * expert_state_bytes(hook.cfg.model) > 0
    assert d.balancedness_after > d.balancedness_before
    assert rep.new_version == fleet.placement.version == start.version + 1
    assert fleet.placement.replicas == target.replicas
    assert hook.rebalance(fleet, target) is None and not hook.last_decision.changed  # already there
    with pytest.raises(TypeError, match="expected a PlacementDecision, a Placement or None"):
        hook.rebalance(fleet, "v2")


def test_capacities_default_to_one_spare_slot():
    hook = _hook()
    caps = hook.capacities(Placement.contiguous(L, E, A))
    assert caps.slots_per_actor == E // A + 1 and caps.bytes_per_expert == expert_state_bytes(hook.cfg.model)
    assert _hook(slots_per_actor=5).capacities(Placement.contiguous(L, E, A)).slots_per_actor == 5
