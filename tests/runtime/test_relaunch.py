"""Cluster.restart (runtime/relaunch.py): a fresh cluster for another config on the same processes trains exactly
as the in-process oracle of that config, a party Ray restarts afterwards comes back with that config, and a
different layout is refused with the running cluster left usable."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from moe_runtime.runtime.ray_env import ClusterStartError
from moe_runtime.runtime.relaunch import layout_changes
from tests.runtime.helpers import make_config, oracle_losses


def test_layout_changes_names_each_field():
    a = make_config(__import__("pathlib").Path("/tmp"), expert_actors=2).cluster
    b = a.model_copy(update={"expert_actors": 4, "torch_threads": 2, "router_workers": 1})  # set per party
    assert layout_changes(a, b) == ["cluster.expert_actors: 2 -> 4"]
    assert layout_changes(a, a) == []
    c = a.model_copy(update={"num_gpus": a.num_gpus + 2})  # the GPUs of a Ray the cluster started (its own)
    assert layout_changes(a, c) == [f"cluster.num_gpus: {a.num_gpus} -> {a.num_gpus + 2}"]
    assert layout_changes(a, c, ray_owned=False) == []  # a Ray it attached to: num_gpus did not set it


@pytest.mark.slow
def test_restart_trains_as_the_new_configs_oracle_on_the_same_processes(ray_session, tmp_path):
    from moe_runtime.runtime.cluster import Cluster

    first = make_config(tmp_path / "a", expert_actors=2)
    d = first.model_dump(mode="json")
    d["model"]["router"] = "linear"  # another model (router) and another seed: nothing of the first may remain
    d["train"]["seed"] = 1
    d["train"]["checkpoint_dir"] = str(tmp_path / "b" / "auto")
    second = type(first).model_validate(d)
    want = oracle_losses(second, 4)
    c = Cluster.start(first)
    try:
        c.train(1)
        pids = sorted([i.pid for i in c.actor_infos] + c.worker_pids)
        with pytest.raises(ClusterStartError, match="cluster.expert_actors: 2 -> 4"):
            c.restart(make_config(tmp_path / "c", expert_actors=4))
        assert c.forward(torch.zeros(2, 8, dtype=torch.long)).shape[0] == 2  # refused: still usable
        c2 = c.restart(second)
        c = c2
        assert sorted([i.pid for i in c.actor_infos] + c.worker_pids) == pids  # the same processes
        assert c.step == 0
        got = c.train(2).losses
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want[:2]), rtol=1e-4, atol=0)
        # Ray restarts a killed party with its first constructor arguments; it must come back with `second`
        os.kill(c.worker_pids[1], signal.SIGKILL)
        rest = c.train(4).losses
        torch.testing.assert_close(torch.tensor(rest), torch.tensor(want[2:]), rtol=1e-4, atol=0)
        assert c.recoveries >= 1 and c.worker_pids[1] not in pids
        # fewer router workers (one killed), then more again (one started): each a fresh cluster of its config
        for workers, seed in ((1, 2), (2, 3)):
            d = second.model_dump(mode="json")
            d["cluster"]["router_workers"], d["train"]["seed"] = workers, seed
            cfg = type(first).model_validate(d)
            c = c.restart(cfg)
            assert len(c.worker_pids) == workers and c.actor_infos[0].pid in pids
            torch.testing.assert_close(torch.tensor(c.train(2).losses), torch.tensor(oracle_losses(cfg, 2)),
                                       rtol=1e-4, atol=0)
    finally:
        c.shutdown()
