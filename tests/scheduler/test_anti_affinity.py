"""Replica anti-affinity across nodes: properties of the pure repairs over random placements and node maps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_runtime.config import ConfigError, parse_config
from moe_runtime.placement import Placement, PlacementError
from moe_runtime.scheduler.anti_affinity import (
    cross_node_replicas,
    node_loss_orphans,
    single_node_replicated,
    spread_over_nodes,
)


@st.composite
def placements(draw):
    """A random valid placement (1-3 layers, 1-6 experts, 1-6 actors, 1-3 replicas each) and a node per actor."""
    num_actors = draw(st.integers(1, 6))
    num_layers = draw(st.integers(1, 3))
    num_experts = draw(st.integers(1, 6))
    actor = st.integers(0, num_actors - 1)
    rows = tuple(
        tuple(tuple(draw(st.lists(actor, min_size=1, max_size=min(3, num_actors), unique=True)))
              for _ in range(num_experts))
        for _ in range(num_layers)
    )  # fmt: skip
    nodes = tuple(draw(st.lists(st.integers(0, 2), min_size=num_actors, max_size=num_actors)))
    return Placement(num_actors, rows, draw(st.integers(0, 5)), nodes)


def spans(p: Placement, layer: int, e: int) -> int:
    return len({p.node_of(a) for a in p.replicas[layer][e]})


@settings(max_examples=300, deadline=None)
@given(placements())
def test_spread_keeps_counts_and_spans_nodes(p):
    q = spread_over_nodes(p)
    assert q.replica_counts() == p.replica_counts()  # no extra memory: replicas are moved, not added
    assert single_node_replicated(q) == []
    multi_node = len(set(p.actor_nodes)) > 1
    for layer, row in enumerate(p.replicas):
        for e, actors in enumerate(row):
            new = q.replicas[layer][e]
            assert new[0] == actors[0]  # the primary stays
            if spans(p, layer, e) > 1 or len(actors) == 1 or not multi_node:
                assert new == actors  # nothing to fix: untouched
            else:
                assert spans(q, layer, e) == 2 and len(set(new) & set(actors)) == len(actors) - 1
    assert spread_over_nodes(q) is q  # idempotent
    assert (q is p) == (single_node_replicated(p) == [])
    if q is not p:
        assert q.version == p.version + 1 and q.actor_nodes == p.actor_nodes


@settings(max_examples=300, deadline=None)
@given(placements(), st.data())
def test_cross_node_replicas_protect_every_asked_expert(p, data):
    keys = data.draw(st.none() | st.lists(st.tuples(st.integers(0, p.num_layers - 1),
                                                    st.integers(0, p.num_experts - 1)), max_size=6))
    q = cross_node_replicas(p, keys=keys)
    asked = {(la, e) for la in range(p.num_layers) for e in range(p.num_experts)} if keys is None else set(keys)
    multi_node = len(set(p.actor_nodes)) > 1
    for layer, row in enumerate(p.replicas):
        for e, actors in enumerate(row):
            new = q.replicas[layer][e]
            assert new[: len(actors)] == actors  # only added, at the end
            assert len(new) - len(actors) in (0, 1)
            if multi_node and (layer, e) in asked:
                assert spans(q, layer, e) >= 2
            if (layer, e) not in asked or spans(p, layer, e) >= 2:
                assert new == actors
    if multi_node:  # with every expert protected, no single node's loss orphans any
        full = cross_node_replicas(p)
        assert all(node_loss_orphans(full, n) == [] for n in set(p.actor_nodes))
    assert cross_node_replicas(q, keys=keys) is q


def test_least_loaded_actor_on_the_other_node_is_chosen():
    # actors 0, 1 on node 0; 2, 3 on node 1; actor 2 holds more of layer 0 than actor 3
    p = Placement(4, (((0, 1), (2,), (2,), (3,)),), 0, (0, 0, 1, 1))
    q = spread_over_nodes(p)
    assert q.replicas[0][0] == (0, 3)  # replica 1 moved off node 0 to the emptier actor there
    assert node_loss_orphans(q, 0) == [] and node_loss_orphans(q, 1) == [(0, 1), (0, 2), (0, 3)]
    full = cross_node_replicas(q)
    assert [node_loss_orphans(full, n) for n in (0, 1)] == [[], []]
    assert full.replica_counts() == [[2, 2, 2, 2]]


def test_one_node_and_bad_node_map():
    p = Placement(2, (((0, 1),),), 0, (0, 0))
    assert spread_over_nodes(p) is p and cross_node_replicas(p) is p  # nowhere else to go
    with pytest.raises(PlacementError, match="actor_nodes has 3 entries: expected num_actors \\(2\\)"):
        spread_over_nodes(p, [0, 1, 1])


def test_config_option():
    assert parse_config({}).scheduler.replica_anti_affinity == "none"
    assert parse_config({"scheduler": {"replica_anti_affinity": "node"}}).scheduler.replica_anti_affinity == "node"
    with pytest.raises(ConfigError, match="replica_anti_affinity"):
        parse_config({"scheduler": {"replica_anti_affinity": "rack"}})


def test_hook_spreads_what_it_applies_when_the_option_is_on():
    from moe_runtime.config import RuntimeConfig, SchedulerConfig
    from moe_runtime.scheduler.hook import SchedulerHook
    from tests.scheduler.fakes import FakeFleet

    nodes = (0, 0, 1, 1)
    start = Placement.contiguous(2, 8, 4, nodes)
    same_node = [[tuple(a) for a in row] for row in start.replicas]
    same_node[0][0] = (0, 1)  # a hot expert replicated on both actors of node 0
    given = Placement(4, tuple(tuple(r) for r in same_node), 0, nodes)
    for option, want in (("none", (0, 1)), ("node", (0, 2))):  # actors 2, 3 tie: the lower
        fleet = FakeFleet(start)
        hook = SchedulerHook(RuntimeConfig(scheduler=SchedulerConfig(replica_anti_affinity=option)))
        hook.rebalance(fleet, given)
        assert fleet.placement.replicas[0][0] == want, option
        assert fleet.placement.replicas[1] == start.replicas[1]
    assert "replica_anti_affinity: node" in hook.last_decision_str
