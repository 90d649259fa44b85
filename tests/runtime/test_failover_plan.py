"""runtime/failover.py's pure part: which actors are broken and where each missing shard is copied from."""

from __future__ import annotations

from moe_runtime.placement import Placement
from moe_runtime.records import ActorInfo
from moe_runtime.runtime.failover import broken_actors, repair_sources

BASE = Placement.contiguous(1, 4, 2)  # experts 0, 1 on actor 0; 2, 3 on actor 1
REPLICATED = BASE.with_replicas((((0, 1), (0,), (1, 0), (1,)),))  # experts 0 and 2 on both actors


def _info(i: int, shards, version: int) -> ActorInfo:
    return ActorInfo(i, 100 + i, "n", f"127.0.0.1:{9000 + i}", (), "cpu", tuple(shards), version)


def test_a_restarted_actor_is_broken_and_copies_from_the_live_replica():
    held = [REPLICATED.shards_of(0), []]  # actor 1 restarted empty
    infos = [_info(0, held[0], REPLICATED.version), _info(1, [], 0)]
    assert broken_actors(infos, REPLICATED) == [1]
    plan = repair_sources(REPLICATED, held)
    assert plan.copies == {1: {(0, 0): 0, (0, 2): 0}}  # its replicated experts come from actor 0
    assert plan.orphans == {1: [(0, 3)]}  # its only-copy expert is lost
    assert plan.drops == {}


def test_a_half_migrated_actor_drops_extras_and_the_version_is_checked():
    held = [BASE.shards_of(0) + [(0, 2)], BASE.shards_of(1)]  # a copy arrived on actor 0, never switched
    infos = [_info(0, held[0], 5), _info(1, held[1], BASE.version)]
    assert broken_actors(infos, BASE) == [0]
    plan = repair_sources(BASE, held)
    assert plan.copies == {} and plan.orphans == {} and plan.drops == {0: [(0, 2)]}


def test_a_whole_consistent_fleet_needs_nothing():
    held = [REPLICATED.shards_of(a) for a in range(2)]
    assert broken_actors([_info(a, held[a], REPLICATED.version) for a in range(2)], REPLICATED) == []
    plan = repair_sources(REPLICATED, held)
    assert plan.copies == {} and plan.orphans == {} and plan.drops == {}
