"""The placement policy: invariants (property tests), the Zipf comparison against EPLB, and small cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_runtime.config import SchedulerConfig
from moe_runtime.placement import Placement
from moe_runtime.scheduler.eplb import eplb_placement
from moe_runtime.scheduler.load import LoadSnapshot
from moe_runtime.scheduler.policy import (
    Capacities,
    PolicyParams,
    align_actors,
    bytes_moved,
    decide,
)

MB = 2**20


def zipf_loads(num_layers: int, num_experts: int, s: float, seed: int, scale: float = 1e4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.arange(1, num_experts + 1, dtype=float) ** -s
    return np.stack([rng.permutation(base) * scale for _ in range(num_layers)])


def node_imbalance(snapshot: LoadSnapshot, placement: Placement) -> float:
    loads = snapshot.actor_loads(placement)
    nodes = np.asarray(placement.actor_nodes)
    per_node = np.stack([loads[:, nodes == n].sum(axis=1) for n in np.unique(nodes)], axis=1)
    return float(per_node.max(axis=1).sum() / per_node.mean(axis=1).sum())


def apply_moves(old: Placement, decision) -> list[list[set[int]]]:
    rows = [[set(a) for a in row] for row in old.replicas]
    for m in decision.moves:
        holders = rows[m.layer][m.expert]
        if m.kind == "drop":
            assert m.src_actor is None and m.dst_actor in holders
            holders.discard(m.dst_actor)
            continue
        assert m.src_actor in old.replicas[m.layer][m.expert], "copies come from a replica held before"
        assert m.dst_actor not in holders
        holders.add(m.dst_actor)
        if m.kind == "move":
            holders.discard(m.src_actor)
    return rows


def check_invariants(snapshot, old, caps, params, decision) -> None:
    new = decision.placement
    L, E, A = old.num_layers, old.num_experts, old.num_actors
    assert (new.num_layers, new.num_experts, new.num_actors) == (L, E, A)
    max_rep = params.max_replicas_per_expert or A
    totals = np.zeros(A, dtype=int)
    for layer in range(L):
        used = np.zeros(A, dtype=int)
        for e in range(E):
            actors = new.replicas[layer][e]
            assert len(actors) >= 1 and len(set(actors)) == len(actors)
            assert len(actors) <= max(max_rep, len(old.replicas[layer][e]))
            for a in actors:
                used[a] += 1
        assert used.max() <= caps.slots_per_actor
        totals += used
    if caps.memory_slots_per_actor is not None:
        assert totals.max() <= caps.memory_slots_per_actor
    moved = bytes_moved(old, new, caps.bytes_per_expert)
    assert decision.bytes_to_move == moved
    if params.byte_budget is not None:
        assert moved <= params.byte_budget
    before, after = snapshot.balancedness(old), snapshot.balancedness(new)
    assert decision.balancedness_before == pytest.approx(before, rel=1e-12)
    assert decision.balancedness_after == pytest.approx(after, rel=1e-12)
    assert after >= before * (1 - 1e-12)
    layer_before = snapshot.actor_loads(old).max(axis=1)
    layer_after = snapshot.actor_loads(new).max(axis=1)
    assert np.all(layer_after <= layer_before * (1 + 1e-9) + 1e-12)  # no layer gets worse
    assert decision.replica_counts == tuple(tuple(r) for r in new.replica_counts())
    if decision.changed:
        assert new.version == old.version + 1
        gain = 1 - before / after  # relative drop of sum_l max
        assert gain >= params.min_gain - 1e-12 and gain > 0
        assert apply_moves(old, decision) == [[set(a) for a in row] for row in new.replicas]
    else:
        assert new is old and decision.moves == () and moved == 0


# ----------------------------------------------------------------------------------------------- properties


@st.composite
def scenarios(draw):
    L = draw(st.integers(1, 3))
    A = draw(st.integers(2, 6))
    E = draw(st.integers(2, 12))
    S = -(-E // A) + draw(st.integers(0, 2))
    nodes = tuple(sorted(draw(st.lists(st.integers(0, 2), min_size=A, max_size=A))))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(L):
        used = np.zeros(A, dtype=int)
        row = []
        for _e in range(E):
            free = np.flatnonzero(used < S)
            a = int(rng.choice(free))
            used[a] += 1
            row.append([a])
        for _extra in range(int(rng.integers(0, A * S - E + 1))):
            e = int(rng.integers(E))
            free = [a for a in np.flatnonzero(used < S) if a not in row[e]]
            if free:
                a = int(rng.choice(free))
                used[a] += 1
                row[e].append(a)
        rows.append(tuple(tuple(sorted(r)) for r in row))
    placement = Placement(A, tuple(rows), version=draw(st.integers(0, 5)), actor_nodes=nodes)
    kind = draw(st.sampled_from(["zipf", "uniform", "sparse", "zero"]))
    if kind == "zipf":
        tokens = zipf_loads(L, E, draw(st.floats(0.5, 2.0)), seed)
    elif kind == "uniform":
        tokens = rng.uniform(0, 100, (L, E))
    elif kind == "sparse":
        tokens = rng.integers(0, 3, (L, E)) * rng.integers(1, 1000, (L, E)).astype(float)
    else:
        tokens = np.zeros((L, E))
    use = [sum(a in actors for row in rows for actors in row) for a in range(A)]
    memory = draw(st.one_of(st.none(), st.integers(max(use), L * S + 2)))
    bpe = draw(st.sampled_from([1, 1000]))
    caps = Capacities(S, bpe, nodes, memory)
    budget = draw(st.one_of(st.none(), st.integers(0, 6).map(lambda k: k * bpe)))
    params = PolicyParams(
        min_gain=draw(st.sampled_from([0.0, 0.01, 0.1])),
        byte_budget=budget,
        max_replicas_per_expert=draw(st.one_of(st.none(), st.integers(1, A))),
        min_gain_per_copy=draw(st.sampled_from([0.0, 0.01, 0.05])),
    )
    return LoadSnapshot(0, tokens), placement, caps, params


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_policy_invariants(scenario):
    snapshot, placement, caps, params = scenario
    decision = decide(snapshot, placement, caps, params)
    check_invariants(snapshot, placement, caps, params, decision)
    again = decide(snapshot, placement, caps, params)
    assert again == decision  # deterministic


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_unlimited_budget_is_at_least_as_balanced_as_eplb(scenario):
    snapshot, placement, caps, _ = scenario
    caps = Capacities(caps.slots_per_actor, caps.bytes_per_expert, caps.actor_nodes)  # no memory limit
    for price in (0.0, 0.05):
        params = PolicyParams(min_gain=0.0, byte_budget=None, min_gain_per_copy=price)
        decision = decide(snapshot, placement, caps, params)
        eplb = eplb_placement(snapshot.tokens, placement.num_actors, caps.slots_per_actor, caps.actor_nodes)
        assert decision.balancedness_after >= snapshot.balancedness(eplb) * (1 - 1e-9)


# ----------------------------------------------------------------------------------------------- Zipf vs EPLB

ZIPF_NODES = (0, 0, 0, 0, 1, 1, 1, 1)


@pytest.mark.parametrize(("slots", "seed"), [(5, 0), (6, 1), (8, 2)])
def test_zipf_ours_beats_eplb_on_balance_and_bytes(slots, seed):
    L, E, A = 4, 32, 8
    tokens = zipf_loads(L, E, 1.2, seed)
    snapshot = LoadSnapshot(100, tokens)
    start = Placement.contiguous(L, E, A, ZIPF_NODES)
    bpe = 3 * MB
    caps = Capacities(slots, bpe, ZIPF_NODES)
    decision = decide(snapshot, start, caps, PolicyParams(min_gain=0.05, byte_budget=None))
    eplb = eplb_placement(tokens, A, slots, ZIPF_NODES)
    eplb_bal, eplb_bytes = snapshot.balancedness(eplb), bytes_moved(start, eplb, bpe)
    assert decision.changed
    assert decision.balancedness_before < 0.4  # contiguous placement under Zipf(1.2) is badly skewed
    assert decision.balancedness_after >= eplb_bal
    assert decision.balancedness_after > 0.9
    assert decision.bytes_to_move <= eplb_bytes
    # Node-first packing: the two nodes are at least as even as under EPLB.
    assert node_imbalance(snapshot, decision.placement) <= node_imbalance(snapshot, eplb)
    # EPLB relabelled to maximise overlap (the maintainer's suggestion) moves less than raw EPLB, but not
    # less than ours.
    aligned = align_actors(eplb, start)
    assert snapshot.balancedness(aligned) == pytest.approx(eplb_bal)
    assert decision.bytes_to_move <= bytes_moved(start, aligned, bpe) <= eplb_bytes


def test_zipf_byte_budget_trades_balance_for_bytes():
    L, E, A = 4, 32, 8
    tokens = zipf_loads(L, E, 1.2, 0)
    snapshot = LoadSnapshot(0, tokens)
    start = Placement.contiguous(L, E, A, ZIPF_NODES)
    caps = Capacities(5, MB, ZIPF_NODES)
    results = []
    for copies in (0, 2, 8, 32, None):
        params = PolicyParams(min_gain=0.0, byte_budget=None if copies is None else copies * MB)
        d = decide(snapshot, start, caps, params)
        if copies is not None:
            assert d.bytes_to_move <= copies * MB
        results.append(d.balancedness_after)
    assert results[0] == pytest.approx(snapshot.balancedness(start))  # no budget, no change
    assert results[1] > results[0] and results[2] > results[1] and results[3] > results[2]
    assert results[4] >= results[3] - 1e-12


# ----------------------------------------------------------------------------------------------- small cases


def test_small_gain_keeps_the_placement():
    rng = np.random.default_rng(3)
    tokens = 1000 + rng.uniform(-20, 20, (2, 16))  # nearly uniform: contiguous is within ~3% of ideal
    start = Placement.contiguous(2, 16, 4)
    snapshot = LoadSnapshot(0, tokens)
    caps = Capacities(5, MB)
    kept = decide(snapshot, start, caps, PolicyParams(min_gain=0.05))
    assert not kept.changed and kept.placement is start and kept.bytes_to_move == 0
    assert "min_gain" in kept.reason
    # With no threshold the same input is improved, so the test above is not vacuous.
    eager = decide(snapshot, start, caps, PolicyParams(min_gain=0.0, min_gain_per_copy=0.0))
    assert eager.changed and eager.balancedness_after > kept.balancedness_before


def test_hot_expert_is_replicated_and_moves_are_reported():
    # 1 layer, 4 experts on 2 actors, expert 0 takes most tokens.
    start = Placement(2, (((0,), (0,), (1,), (1,)),), version=3, actor_nodes=(0, 1))
    snapshot = LoadSnapshot(0, [[100.0, 10.0, 10.0, 10.0]])
    decision = decide(snapshot, start, Capacities(3, 7), PolicyParams(min_gain=0.0))
    assert decision.changed and decision.placement.version == 4
    assert decision.placement.replicas[0][0] == (0, 1)
    assert decision.replica_counts[0][0] == 2
    # Perfect balance (65 each) needs a second copy of a cold expert too: 50 + 10 + 5 on both sides.
    loads = snapshot.actor_loads(decision.placement)[0]
    np.testing.assert_allclose(loads, [65.0, 65.0])
    assert decision.balancedness_after == pytest.approx(1.0)
    assert decision.bytes_to_move == 7 * sum(m.kind != "drop" for m in decision.moves)
    assert any(m.kind == "replicate" and m.expert == 0 and m.dst_actor == 1 for m in decision.moves)


def test_no_load_and_balanced_inputs_are_unchanged():
    start = Placement.contiguous(2, 8, 4)
    caps = Capacities(3, MB)
    d = decide(LoadSnapshot(0, np.zeros((2, 8))), start, caps, PolicyParams(min_gain=0.0))
    assert not d.changed and "no load" in d.reason
    d = decide(LoadSnapshot(0, np.full((2, 8), 5.0)), start, caps, PolicyParams(min_gain=0.0))
    assert not d.changed and d.balancedness_after == 1.0


def test_memory_limit_and_max_replicas_are_respected():
    L, E, A = 3, 8, 4
    tokens = zipf_loads(L, E, 1.5, 4)
    start = Placement.contiguous(L, E, A)
    snapshot = LoadSnapshot(0, tokens)
    caps = Capacities(4, MB, memory_slots_per_actor=7)  # 6 used per actor: one spare slot over all layers
    params = PolicyParams(min_gain=0.0, max_replicas_per_expert=2)
    decision = decide(snapshot, start, caps, params)
    check_invariants(snapshot, start, caps, params, decision)
    assert decision.changed
    per_actor = [len(decision.placement.shards_of(a)) for a in range(A)]
    assert max(per_actor) <= 7


def test_invalid_inputs_are_rejected():
    start = Placement.contiguous(1, 8, 2)  # 4 experts per actor
    snapshot = LoadSnapshot(0, np.ones((1, 8)))
    with pytest.raises(ValueError, match="more than slots_per_actor = 3"):
        decide(snapshot, start, Capacities(3, 1), PolicyParams())
    with pytest.raises(ValueError, match="more than memory_slots_per_actor = 2"):
        decide(snapshot, start, Capacities(4, 1, memory_slots_per_actor=2), PolicyParams())
    with pytest.raises(ValueError, match="tokens shape"):
        decide(LoadSnapshot(0, np.ones((2, 8))), start, Capacities(4, 1), PolicyParams())
    with pytest.raises(ValueError, match="actor_nodes"):
        decide(snapshot, start, Capacities(4, 1, actor_nodes=(0, 1, 2)), PolicyParams())
    with pytest.raises(ValueError, match="min_gain"):
        PolicyParams(min_gain=-1)


def test_params_from_config():
    params = PolicyParams.from_config(SchedulerConfig(min_gain=0.1, byte_budget_mb=2.0))
    assert params.min_gain == 0.1 and params.byte_budget == 2 * MB
    caps = Capacities.from_memory(4, bytes_per_expert=3 * MB, memory_bytes_per_actor=10 * MB)
    assert caps.memory_slots_per_actor == 3


def test_bytes_moved_counts_new_replicas_only():
    old = Placement(3, (((0,), (1, 2)),))
    new = Placement(3, (((0, 1), (2,)),))  # +1 copy of expert 0, one drop of expert 1
    assert bytes_moved(old, new, 5) == 5
    assert bytes_moved(old, old, 5) == 0
    with pytest.raises(ValueError, match="differ in shape"):
        bytes_moved(old, Placement.contiguous(2, 2, 3), 5)
