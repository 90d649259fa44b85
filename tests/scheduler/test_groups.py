"""The expert-group constraint (grouped and node-limited routing): decide_within_groups keeps each group's experts
on its actors, is `decide` for one group, and the hook uses it for those routings only."""

from __future__ import annotations

import numpy as np
import pytest

from moe_runtime.config import ModelConfig, RuntimeConfig, SchedulerConfig
from moe_runtime.placement import Placement
from moe_runtime.scheduler.groups import (
    ExpertGroups,
    contiguous_groups,
    decide_within_groups,
    node_groups,
    routing_groups,
)
from moe_runtime.scheduler.hook import SchedulerHook
from moe_runtime.scheduler.load import LoadSnapshot
from moe_runtime.scheduler.policy import Capacities, PolicyParams, decide
from tests.scheduler.fakes import FakeFleet

L, E, A = 2, 8, 4


def _skewed(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    load = rng.uniform(5, 20, size=(L, E))
    load[:, 0] = 300.0  # group 0's expert 0 is hot
    load[:, 5] = 150.0  # and one of group 1's
    return load


def test_groups_partition_and_report_violations():
    g = contiguous_groups(E, A, 2)
    assert g.experts == ((0, 1, 2, 3), (4, 5, 6, 7)) and g.actors == ((0, 1), (2, 3))
    assert g.violations(Placement.contiguous(L, E, A)) == []
    bad = Placement(A, ((((0, 2),) + tuple((e * A // E,) for e in range(1, E))),) * L)
    assert g.violations(bad)[0] == "(layer 0, expert 0) on actor 2, outside group 0's actors [0, 1]"
    with pytest.raises(ValueError, match="must divide num_experts"):
        contiguous_groups(E, A, 3)
    with pytest.raises(ValueError, match="must partition"):
        ExpertGroups(((0, 1), (1, 2)), ((0,), (1,)))


@pytest.mark.parametrize("seed", range(4))
def test_decide_within_groups_rebalances_inside_each_group_only(seed):
    start = Placement.contiguous(L, E, A)
    groups = contiguous_groups(E, A, 2)
    snap = LoadSnapshot(0, _skewed(seed))
    caps = Capacities(slots_per_actor=4, bytes_per_expert=1)
    params = PolicyParams(min_gain=0.0)
    d = decide_within_groups(snap, start, caps, params, groups)
    assert d.changed and groups.violations(d.placement) == []
    assert d.balancedness_after > d.balancedness_before
    free = decide(snap, start, caps, params)  # unconstrained: crosses groups (hot expert 0 onto actors 2, 3)
    assert free.changed and groups.violations(free.placement)
    assert d.placement.version == start.version + 1
    assert d.layer_max_after == tuple(snap.actor_loads(d.placement).max(axis=1))


def test_one_group_is_exactly_decide():
    start = Placement.contiguous(L, E, A)
    snap = LoadSnapshot(0, _skewed())
    caps, params = Capacities(4, 1), PolicyParams(min_gain=0.0)
    one = ExpertGroups((tuple(range(E)),), (tuple(range(A)),))
    a, b = decide_within_groups(snap, start, caps, params, one), decide(snap, start, caps, params)
    assert a.placement == b.placement and a.moves == b.moves and a.reason == b.reason


def test_min_gain_applies_to_the_whole_placement():
    start = Placement.contiguous(L, E, A)
    d = decide_within_groups(LoadSnapshot(0, _skewed()), start, Capacities(4, 1), PolicyParams(min_gain=0.99),
                             contiguous_groups(E, A, 2))
    assert not d.changed and d.placement is start and "< min_gain 99.00%" in d.reason


def test_node_groups_follow_primary_nodes():
    p = Placement.contiguous(L, E, A, actor_nodes=(0, 1, 0, 1))  # Ray may spread actors over nodes like this
    g = node_groups(p)
    assert g.experts == ((0, 1, 4, 5), (2, 3, 6, 7)) and g.actors == ((0, 2), (1, 3))
    assert routing_groups("topk", 1, p) is None and routing_groups("top_p", 1, p) is None
    assert routing_groups("node_limited", 1, p) == g


def test_hook_keeps_groups_for_grouped_routing_and_is_unchanged_for_topk():
    sched = SchedulerConfig(enabled=True, every_steps=1, imbalance_threshold=1.0, min_gain=0.0)
    grouped = RuntimeConfig(model=ModelConfig(preset="tiny", routing="grouped", routing_groups=2), scheduler=sched)
    fleet = FakeFleet(Placement.contiguous(L, E, A))
    assert SchedulerHook(grouped).observe(fleet, 0, _skewed()) is not None
    assert contiguous_groups(E, A, 2).violations(fleet.placement) == []
    topk = SchedulerHook(RuntimeConfig(scheduler=sched))
    fleet2 = FakeFleet(Placement.contiguous(L, E, A))
    topk.observe(fleet2, 0, _skewed())
    start = Placement.contiguous(L, E, A)
    want = decide(LoadSnapshot(0, _skewed()), start, topk.capacities(start), topk.params())
    assert fleet2.placement.replicas == want.placement.replicas


def test_hook_keeps_replicas_on_their_node_for_node_limited_routing():
    sched = SchedulerConfig(enabled=True, every_steps=1, imbalance_threshold=1.0, min_gain=0.0)
    cfg = RuntimeConfig(model=ModelConfig(preset="tiny", routing="node_limited", max_nodes=1), scheduler=sched)
    start = Placement.contiguous(L, E, A, actor_nodes=(0, 0, 1, 1))
    fleet = FakeFleet(start)
    assert SchedulerHook(cfg).observe(fleet, 0, _skewed()) is not None
    assert node_groups(start).violations(fleet.placement) == []
    from moe_runtime.model.routing import expert_nodes

    assert all(expert_nodes(fleet.placement, layer) == expert_nodes(start, layer) for layer in range(L))
