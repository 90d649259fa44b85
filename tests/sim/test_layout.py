"""Layouts and the static placement the simulator starts from."""

from __future__ import annotations

import pytest

from moe_runtime.placement import Placement
from moe_runtime.sim.layout import static_placement


def test_static_placement():
    p = static_placement(2, 8, 4)
    assert p == Placement.contiguous(2, 8, 4)
    q = static_placement(1, 4, 10)
    assert q.replicas[0] == ((0, 4, 8), (1, 5, 9), (2, 6), (3, 7))


def test_layout_from_config():
    from moe_runtime.config import parse_config
    from moe_runtime.sim.layout import Layout, SimError

    def cfg(workers: int, actors: int, **sim):
        return parse_config({"cluster": {"num_gpus": max(workers, actors), "expert_actors": actors,
                                         "router_workers": workers}, "sim": sim})  # fmt: skip

    lay = Layout.from_config(cfg(8, 8, gpus=8, gpus_per_node=4))  # auto: one worker and one actor per GPU
    assert lay.kind == "colocated" and lay.num_devices == 8 and lay.num_nodes == 2
    lay = Layout.from_config(cfg(2, 4, gpus=8, gpus_per_node=4))
    assert lay.kind == "separate" and lay.actor_device.tolist() == [0, 1, 2, 3] and lay.worker_device.tolist() == [4, 5]
    assert lay.spans_nodes(lay.actor_device) is False and lay.spans_nodes(lay.worker_device) is False
    assert lay.link_class()[0].tolist() == [2, 2, 2, 2]  # workers on node 1, actors on node 0
    with pytest.raises(SimError, match="need 6 GPUs"):
        Layout.from_config(cfg(2, 4, gpus=4))
    with pytest.raises(SimError, match="colocated needs"):
        Layout.from_config(cfg(2, 4, gpus=8, layout="colocated"))
    local = Layout.local_cluster(cfg(2, 4))  # the local cluster's processes: one node
    assert local.kind == "separate" and local.num_nodes == 1 and local.num_devices == 6
