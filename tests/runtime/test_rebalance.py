"""Rebalancing a running cluster: expert replicas move / replicate / drop with their AdamW state between steps,
and the math does not change (losses and weights equal the oracle's, which never rebalances)."""

from __future__ import annotations

import grpc
import pytest
import ray
import torch

from moe_runtime.dispatch.codec import decode_frame, encode_frame
from moe_runtime.dispatch.client import ExpertCallError, ExpertClient
from moe_runtime.model.transformer import expert_param_name
from moe_runtime.placement import Move, Placement, diff_moves
from moe_runtime.scheduler.hook import SchedulerHook
from moe_runtime.scheduler.migrate import MigrationError, apply_decision
from moe_runtime.scheduler.types import PlacementDecision


def _with(p: Placement, changes: dict[tuple[int, int], tuple[int, ...]]) -> Placement:
    rows = [list(row) for row in p.replicas]
    for (layer, e), actors in changes.items():
        rows[layer][e] = actors
    return Placement(p.num_actors, tuple(tuple(r) for r in rows), p.version, p.actor_nodes)


def _aggressive_hook(c) -> SchedulerHook:
    sched = c.cfg.scheduler.model_copy(
        update={
            "enabled": True,
            "every_steps": 1,
            "imbalance_threshold": 1.0,
            "min_gain": 0.0,
            "min_gain_per_copy": 0.0,
        }
    )
    return SchedulerHook(c.cfg.model_copy(update={"scheduler": sched}), measure_steps=1)


def test_rebalancing_never_changes_the_math(fresh4, oracle):
    """Hand-made moves + replicas after steps 0 and 2, and the policy deciding after every step: losses and
    expert weights after 5 steps equal the oracle's (a lost exp_avg / exp_avg_sq / step would show in both)."""
    c = fresh4
    default_hook = c.scheduler
    c.scheduler = _aggressive_hook(c)
    base = c.placement  # contiguous: actor a holds experts 2a, 2a+1 of every layer
    forced = {
        # layer 0: expert 0 on three actors, expert 1 moved 0 -> 3, expert 2 replicated; layer 1: 7 moved 3 -> 0
        0: _with(base, {(0, 0): (0, 1, 2), (0, 1): (3,), (0, 2): (1, 3), (1, 7): (0,), (1, 6): (3, 2)}),
        # expert 0 of layer 0 leaves its original actor entirely; expert 1 replicated back
        2: _with(base, {(0, 0): (2,), (0, 1): (3, 0), (1, 3): (1, 2, 3), (1, 7): (0, 1)}),
    }
    kinds: set[str] = set()
    reports = []

    def progress(step: int, loss: float) -> None:
        if step in forced:
            moves = diff_moves(c.placement, forced[step])
            kinds.update(m.kind for m in moves)
            reports.append(c.rebalance(forced[step]))
            assert c.placement.replicas == forced[step].replicas

    try:
        result = c.train(5, progress=progress)
        torch.testing.assert_close(
            torch.tensor(result.losses), torch.tensor(oracle.losses[:5]), rtol=1e-4, atol=0
        )
        weights = c.expert_weights()
        for layer in range(c.cfg.model.num_layers):
            for w in ("w1", "w2"):
                key = expert_param_name(layer, w)
                torch.testing.assert_close(weights[key], oracle.state_after_5[key], rtol=1e-4, atol=1e-6)
        assert kinds >= {"replicate", "move", "drop"}
        assert all(r is not None and r.bytes_moved > 0 and r.moves_applied > 0 for r in reports)
        assert result.extra["rebalances"] >= 3 and result.extra["last_decision"]
        assert result.extra["placement"]["version"] == c.placement.version

        # every replica of an expert holds the same weights AND optimizer state (AdamW state moved with it)
        replicated = [((layer, e), actors) for layer, row in enumerate(c.placement.replicas)
                      for e, actors in enumerate(row) if len(actors) > 1]  # fmt: skip
        assert replicated
        for key, actors in replicated:
            states = ray.get([c.experts[a].state.remote([key]) for a in actors])
            ref = states[0][key]
            assert int(ref["w1.step"]) == 5 and float(ref["w1.exp_avg_sq"].abs().sum()) > 0
            for s in states[1:]:
                assert set(s[key]) == set(ref)
                for name, t in ref.items():
                    torch.testing.assert_close(s[key][name], t, rtol=0, atol=0)

        st = c.status()
        assert st["healthy"]
        sched = st["scheduler"]
        assert sched["rebalances"] == result.extra["rebalances"] and isinstance(sched["last_decision"], str)
        assert sched["imbalance"] >= 1.0
        if sched["predicted_gain"] is not None and c.scheduler.measured_balancedness is not None:
            assert sched["measured_gain"] is not None
        # every actor serves the new version, and only the shards the placement gives it
        for i, a in enumerate(st["expert_actors"]):
            assert a["placement_version"] == c.placement.version
            assert sorted(map(tuple, a["shards"])) == c.placement.shards_of(i)
    finally:
        c.scheduler = default_hook


def test_move_then_step_equals_no_move(fresh4, oracle):
    """One step, move every expert of actor 0 elsewhere (state read from actor 0, loaded, then dropped), then the
    next four steps and the final expert weights equal the oracle's."""
    c = fresh4
    c.train_step()
    keys = c.placement.shards_of(0)
    before = ray.get(c.experts[0].state.remote(keys))
    moved = _with(c.placement, {(layer, e): (3 - e % 2,) for layer in range(2) for e in (0, 1)})
    rep = c.rebalance(moved)
    assert rep.moves_applied == 4 and rep.new_version == c.placement.version
    assert c.placement.shards_of(0) == []
    assert ray.get(c.experts[0].info.remote()).shards == ()
    for key in keys:  # weights, exp_avg, exp_avg_sq and step arrived bit for bit
        after = ray.get(c.experts[3 - key[1] % 2].state.remote([key]))[key]
        assert set(after) == set(before[key]) >= {"w1", "w2", "w1.exp_avg", "w1.exp_avg_sq", "w1.step"}
        for name, t in before[key].items():
            torch.testing.assert_close(after[name], t, rtol=0, atol=0)
    losses = [c.train_step().loss for _ in range(4)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(oracle.losses[1:5]), rtol=1e-4, atol=0)
    weights = c.expert_weights()  # a lost optimizer state would move these by ~lr, far above atol
    for layer in range(c.cfg.model.num_layers):
        for w in ("w1", "w2"):
            key = expert_param_name(layer, w)
            torch.testing.assert_close(weights[key], oracle.state_after_5[key], rtol=1e-4, atol=1e-6)


def test_stale_placement_version_is_rejected_after_a_rebalance(fresh4):
    c = fresh4
    old = c.placement
    c.rebalance(_with(old, {(0, 0): (0, 1)}))
    new = c.placement
    assert new.version == old.version + 1
    st = c.status()["expert_actors"][1]
    x = torch.randn(3, c.cfg.model.hidden_size)

    def frame(pv: int) -> bytes:
        return encode_frame(
            "dispatch",
            layer=0,
            step=c.step,
            mb=0,
            pv=pv,
            experts=[0],
            counts=[3],
            tensors={"x": x},
            meta={"src": 0, "save": False},
        )

    with ExpertClient(st["address"], c._token, 10.0) as client:
        with pytest.raises(ExpertCallError) as info:
            client.dispatch(frame(old.version), layer=0, step=c.step).result()
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert (
            f"placement version {old.version} but this server is at version {new.version}"
            in info.value.details
        )
        y = decode_frame(client.dispatch(frame(new.version), layer=0, step=c.step).result()).tensors["y"]
        assert y.shape == x.shape
    # the router workers got the new placement: a step runs (and its frames carry the new version)
    assert c.train_step().loss > 0


def test_bad_decisions_are_refused_naming_the_move(fresh4):
    c = fresh4
    same_version = Placement(
        c.placement.num_actors,
        _with(c.placement, {(0, 0): (0, 1)}).replicas,
        c.placement.version,
        c.placement.actor_nodes,
    )
    with pytest.raises(MigrationError, match="must be above the cluster's"):
        apply_decision(c.fleet, same_version)
    target = c.placement.with_replicas(_with(c.placement, {(0, 0): (0, 1)}).replicas)
    wrong_src = PlacementDecision(target, True, (), (Move(0, 0, 2, 1, "replicate"),), 1.0, 1.0, 0, "test")
    with pytest.raises(MigrationError, match=r"replicate \(layer 0, expert 0\) actor 2 -> actor 1"):
        apply_decision(c.fleet, wrong_src)
    assert c.placement.version == target.version - 1  # nothing applied
