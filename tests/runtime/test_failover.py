"""Serving through a lost expert actor (dispatch/failover.py, runtime/failover.py): with a live replica of every
expert it held, forward() keeps answering with the same logits; without one, forward() fails naming the actor,
the layer and the experts. Either way the restarted actor reloads its shards and rejoins without a manual
recover(), and status() tells the truth in between."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
import torch

from tests.runtime.test_faults import _pid, _wait_dead


def _replicate_actor(c, actor: int):
    """A placement where every expert of `actor` also lives on the next actor."""
    p = c.placement
    other = (actor + 1) % p.num_actors
    rows = [list(r) for r in p.replicas]
    for layer, e in p.shards_of(actor):
        rows[layer][e] = tuple(rows[layer][e]) + ((other,) if other not in rows[layer][e] else ())
    return p.with_replicas(tuple(tuple(r) for r in rows))


def test_forward_after_a_kill_fails_over_to_replicas_and_the_actor_rejoins(fresh4, oracle):
    c = fresh4
    c.rebalance(_replicate_actor(c, 2))
    probe = oracle.probe
    want = c.forward(probe)
    victim = _pid(c.experts[2])
    os.kill(victim, signal.SIGKILL)
    _wait_dead(victim)
    t0 = time.perf_counter()
    got = c.forward(probe)  # before: UNAVAILABLE ... Connection refused for ~40 s
    failover_s = time.perf_counter() - t0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for _ in range(3):  # more requests while the actor restarts: none fails
        torch.testing.assert_close(c.forward(probe), want, rtol=1e-5, atol=1e-6)
    c.wait_healed(120)
    status = c.status()
    a2 = status["expert_actors"][2]
    assert status["healthy"], [a["health"] for a in status["expert_actors"]]
    assert a2["pid"] != victim and a2["reachable"]
    assert a2["shards"] == [list(k) for k in c.placement.shards_of(2)]
    assert a2["placement_version"] == c.placement.version
    assert status["last_heal"]["from_replicas"] == [2]
    torch.testing.assert_close(c.forward(probe), want, rtol=1e-5, atol=1e-6)
    print(f"failover: first forward after the kill took {failover_s:.3f} s")


def test_forward_without_a_replica_fails_naming_actor_layer_experts_then_rejoins(fresh4, oracle, runtime_tmp):
    c = fresh4
    c.checkpoint(runtime_tmp / "serve")  # of the current step: the lost shards come back from it
    probe = oracle.probe
    want = c.forward(probe)
    victim = _pid(c.experts[1])
    os.kill(victim, signal.SIGKILL)
    _wait_dead(victim)
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        c.forward(probe)
    msg = str(info.value)
    assert "actor 1" in msg and "layer 0" in msg and "only replica of experts [" in msg, msg
    status = c.status()  # forward healed before raising: the restarted actor holds its shards again
    assert status["healthy"], [a["health"] for a in status["expert_actors"]]
    assert status["last_heal"]["from_checkpoint"] == [1]
    torch.testing.assert_close(c.forward(probe), want, rtol=1e-5, atol=1e-6)


def test_status_is_not_healthy_while_an_actor_is_missing_its_shards(fresh4):
    c = fresh4
    ray.get(c.experts[3].drop_shards.remote(c.placement.shards_of(3)[:1]), timeout=60)
    status = c.status()
    assert not status["healthy"]
    assert "holds 3 shards, the placement gives it 4" in status["expert_actors"][3]["health"]
    c.heal()  # from nowhere: the dropped shard has no other copy, so this rolls back to a checkpoint
    assert c.status()["healthy"]
