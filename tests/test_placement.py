import numpy as np
import pytest

from moe_runtime.placement import (
    Move,
    Placement,
    PlacementError,
    copies_between,
    diff_moves,
    expected_actor_loads,
    split_over_replicas,
)


def test_contiguous_and_round_trip():
    p = Placement.contiguous(2, 8, 4, actor_nodes=(0, 0, 1, 1))
    assert p.shards_of(1) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert p.node_of(3) == 1
    q = Placement.from_json(p.to_json())
    assert q == p
    r = p.with_replicas(((( 0, 1),) + p.replicas[0][1:],) + p.replicas[1:])
    assert r.version == 1 and r.replica_counts()[0][0] == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_actors=2, replicas=(((),),)), r"replicas\[0\]\[0\] is empty"),
    (dict(num_actors=2, replicas=(((0, 0),),)), r"replicas\[0\]\[0\] = \[0, 0\]: duplicate actor"),
    (dict(num_actors=2, replicas=(((2,),),)), r"actor 2 not in \[0, 2\)"),
    (dict(num_actors=2, replicas=(((0,), (1,)), ((0,),))), r"replicas\[1\] has 1 experts: expected 2"),
    (dict(num_actors=2, replicas=(((0,),),), actor_nodes=(0,)), r"actor_nodes has 1 entries"),
])
def test_invalid_placements_are_rejected(kwargs, message):
    with pytest.raises(PlacementError, match=message):
        Placement(**kwargs)


# ----------------------------------------------------------------------------------------------- the rules


def _random_placement(rng: np.random.Generator, num_layers: int, num_experts: int, num_actors: int,
                      nodes: tuple[int, ...] = ()) -> Placement:  # fmt: skip
    rows = tuple(
        tuple(tuple(int(a) for a in rng.permutation(num_actors)[: int(rng.integers(1, num_actors + 1))])
              for _ in range(num_experts))
        for _ in range(num_layers)
    )  # fmt: skip
    return Placement(num_actors, rows, actor_nodes=nodes)


def test_expected_actor_loads_is_the_mean_of_the_split():
    rng = np.random.default_rng(0)
    for _ in range(200):
        E, A = int(rng.integers(1, 9)), int(rng.integers(1, 6))
        row = _random_placement(rng, 1, E, A).replicas[0]
        counts = [int(x) for x in rng.integers(0, 50, E)]
        exact = [0] * A
        for actor, _e, rows in split_over_replicas(counts, row):
            exact[actor] += rows
        expected = expected_actor_loads(counts, row, A)
        assert sum(expected) == pytest.approx(sum(exact))
        # each replicated expert puts at most one row more (or less) than its mean on an actor
        for a in range(A):
            spread = sum(1 for actors in row if a in actors and len(actors) > 1)
            assert abs(expected[a] - exact[a]) < spread + 1e-9
        divisible = [len(actors) * (c // len(actors)) for c, actors in zip(counts, row)]
        exact = [0] * A
        for actor, _e, rows in split_over_replicas(divisible, row):
            exact[actor] += rows
        assert expected_actor_loads(divisible, row, A) == pytest.approx(exact, abs=1e-9)


def test_primary_shards_are_the_first_replicas_once_each():
    p = Placement(3, (((2, 0), (1,), (0, 1, 2)), ((0,), (2, 1), (1,))))
    assert p.primary_of(0, 0) == 2 and p.primary_of(1, 1) == 2
    assert p.primary_shards() == [[(0, 2), (1, 0)], [(0, 1), (1, 2)], [(0, 0), (1, 1)]]
    rng = np.random.default_rng(1)
    q = _random_placement(rng, 3, 7, 4)
    keys = [k for ks in q.primary_shards() for k in ks]
    assert sorted(keys) == [(layer, e) for layer in range(3) for e in range(7)]
    assert all(set(ks) <= set(q.shards_of(a)) for a, ks in enumerate(q.primary_shards()))


def test_expert_data_parallel_layout():
    assert Placement.expert_data_parallel(2, 8, 4, (0, 0, 1, 1)) == Placement.contiguous(2, 8, 4, (0, 0, 1, 1))
    p = Placement.expert_data_parallel(2, 3, 7)
    assert p.replicas[0] == ((0, 3, 6), (1, 4), (2, 5)) and p.replicas[1] == p.replicas[0]
    assert [len(p.shards_of(a)) for a in range(7)] == [2] * 7  # one expert per actor per layer


def _apply(old: Placement, moves) -> list[list[set[int]]]:
    rows = [[set(a) for a in row] for row in old.replicas]
    for m in moves:  # copies first, from holders of the old placement
        if m.kind != "drop":
            assert m.src_actor in old.replicas[m.layer][m.expert] and m.dst_actor not in rows[m.layer][m.expert]
            rows[m.layer][m.expert].add(m.dst_actor)
    for m in moves:
        if m.kind != "replicate":
            gone = m.dst_actor if m.kind == "drop" else m.src_actor
            assert gone in rows[m.layer][m.expert]
            rows[m.layer][m.expert].discard(gone)
    return rows


def test_diff_moves_turns_old_into_new():
    rng = np.random.default_rng(2)
    for _ in range(200):
        L, E, A = int(rng.integers(1, 3)), int(rng.integers(1, 6)), int(rng.integers(1, 6))
        nodes = tuple(sorted(int(n) for n in rng.integers(0, 2, A)))
        old, new = _random_placement(rng, L, E, A, nodes), _random_placement(rng, L, E, A, nodes)
        moves = diff_moves(old, new)
        assert _apply(old, moves) == [[set(a) for a in row] for row in new.replicas]
        assert copies_between(old, new) == sum(m.kind != "drop" for m in moves)
        assert diff_moves(old, old) == () and copies_between(old, old) == 0


def test_diff_moves_source_rule():
    # expert 0: 0, 1 -> 2, 3 on nodes (0, 1, 1, 0): each copy comes from the leaving holder on its own node
    old = Placement(4, (((0, 1), (1,), (0, 2)),), actor_nodes=(0, 1, 1, 0))
    new = Placement(4, (((2, 3), (1, 2, 3), (2,)),), actor_nodes=(0, 1, 1, 0))
    assert diff_moves(old, new) == (
        Move(0, 0, 1, 2, "move"), Move(0, 0, 0, 3, "move"),
        Move(0, 1, 1, 2, "replicate"), Move(0, 1, 1, 3, "replicate"),  # the only holder, whatever the node
        Move(0, 2, None, 0, "drop"),
    )  # fmt: skip
    # explicit nodes override the placement's (none here: all on node 0, so the lowest index wins)
    flat = Placement(4, old.replicas), Placement(4, new.replicas)
    assert diff_moves(*flat)[:2] == (Move(0, 0, 0, 2, "move"), Move(0, 0, 1, 3, "move"))
    assert diff_moves(*flat, actor_nodes=(0, 1, 1, 0))[:2] == diff_moves(old, new)[:2]
    with pytest.raises(PlacementError, match="differ in shape"):
        diff_moves(old, Placement.contiguous(1, 3, 3))
    with pytest.raises(PlacementError, match="differ in shape"):
        copies_between(old, Placement.contiguous(2, 3, 4))
