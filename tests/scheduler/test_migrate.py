"""Migration through the ExpertFleet protocol, on an in-memory fleet (tests/runtime/test_rebalance.py runs it
on Ray): every replica arrives with its full state, copies before drops, errors name the move."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.placement import Move, Placement
from moe_runtime.scheduler.migrate import MigrationError, apply_decision
from moe_runtime.scheduler.types import PlacementDecision
from tests.scheduler.fakes import FakeFleet, shard_state

BASE = Placement.contiguous(2, 4, 2, actor_nodes=(0, 1))  # experts 0, 1 on actor 0; 2, 3 on actor 1


def _with(p: Placement, changes: dict[tuple[int, int], tuple[int, ...]]) -> Placement:
    rows = [list(row) for row in p.replicas]
    for (layer, e), actors in changes.items():
        rows[layer][e] = actors
    return p.with_replicas(tuple(tuple(r) for r in rows))


def _check_serves(fleet: FakeFleet, placement: Placement) -> None:
    assert fleet.placement == placement
    assert fleet.versions == [placement.version] * placement.num_actors
    assert fleet.worker_placements == [placement] * len(fleet.worker_placements)
    for a in range(placement.num_actors):
        assert sorted(fleet.shards[a]) == placement.shards_of(a)
        for k, d in fleet.shards[a].items():  # weights and AdamW state arrived bit for bit
            want = shard_state(*k)
            assert set(d) == set(want)
            for name, t in want.items():
                torch.testing.assert_close(d[name], t, rtol=0, atol=0)


def test_a_placement_is_applied_with_copies_before_drops():
    fleet = FakeFleet(BASE)
    new = _with(BASE, {(0, 0): (0, 1), (0, 1): (1,), (1, 3): (0,), (1, 2): (0, 1)})
    rep = apply_decision(fleet, new)
    _check_serves(fleet, new)
    assert rep.new_version == new.version and rep.moves_applied == 4  # replicate, move, move, replicate
    per_shard = sum(t.numel() * t.element_size() for t in shard_state(0, 0).values())
    assert rep.bytes_moved == 4 * per_shard
    ops = [op for op, _ in fleet.calls]
    assert ops.index("drop") > max(i for i, op in enumerate(ops) if op == "load") and ops[-1] == "switch"


def test_a_decision_gives_the_sources():
    fleet = FakeFleet(BASE)
    target = _with(BASE, {(0, 0): (0, 1)})
    d = PlacementDecision(target, True, (), (Move(0, 0, 0, 1, "replicate"),), 1.0, 1.0, 0, "test")
    apply_decision(fleet, d)
    _check_serves(fleet, target)
    assert ("read", 0) in fleet.calls and ("read", 1) not in fleet.calls


def test_bad_decisions_are_refused_before_anything_moves():
    fleet = FakeFleet(BASE)
    same_version = Placement(2, _with(BASE, {(0, 0): (0, 1)}).replicas, BASE.version, BASE.actor_nodes)
    with pytest.raises(MigrationError, match="must be above the cluster's"):
        apply_decision(fleet, same_version)
    target = _with(BASE, {(0, 0): (0, 1)})
    wrong_src = PlacementDecision(target, True, (), (Move(0, 0, 1, 1, "replicate"),), 1.0, 1.0, 0, "test")
    with pytest.raises(MigrationError, match=r"replicate \(layer 0, expert 0\) actor 1 -> actor 1: the source"):
        apply_decision(fleet, wrong_src)
    missing = PlacementDecision(_with(BASE, {(0, 0): (0, 1), (0, 2): (0,)}), True, (),
                                (Move(0, 0, 0, 1, "replicate"),), 1.0, 1.0, 0, "test")  # fmt: skip
    with pytest.raises(MigrationError, match="do not turn placement v0 into v1"):
        apply_decision(fleet, missing)
    with pytest.raises(MigrationError, match="does not fit the fleet's"):
        apply_decision(fleet, Placement.contiguous(2, 4, 4).with_replicas(Placement.contiguous(2, 4, 4).replicas))
    assert fleet.calls == [] and fleet.placement is BASE


@pytest.mark.parametrize(("op", "actor", "message"), [
    ("read", 0, r"reading state from actor 0 failed for replicate \(layer 0, expert 0\) actor 0 -> actor 1"),
    ("load", 1, r"loading on actor 1 failed for replicate \(layer 0, expert 0\) actor 0 -> actor 1"),
    ("drop", 1, r"dropping on actor 1 failed for move \(layer 1, expert 2\) actor 1 -> actor 0"),
    ("switch", None, "switching to placement version 1 failed"),
])  # fmt: skip
def test_a_failed_call_names_its_actor_and_moves(op, actor, message):
    fleet = FakeFleet(BASE)
    fleet.fail.add((op, actor))
    with pytest.raises(MigrationError, match=message):
        apply_decision(fleet, _with(BASE, {(0, 0): (0, 1), (1, 2): (0,)}))
    assert fleet.placement is BASE  # the fleet's placement changes only when the switch succeeds
