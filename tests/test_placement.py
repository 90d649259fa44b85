import pytest

from moe_runtime.placement import Placement, PlacementError


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
