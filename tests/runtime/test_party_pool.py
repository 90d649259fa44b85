"""party_pool.keep_parties: a shut-down cluster's processes serve the next Cluster.start of the same layout, which
then trains exactly as its config's in-process oracle, also after a parked party died; another layout gets new
processes; leaving the context kills the parked ones; outside it, nothing is parked."""

from __future__ import annotations

import os
import signal

import pytest
import ray
import torch

from moe_runtime.runtime import party_pool
from tests.runtime.helpers import make_config, oracle_losses


def _pids(c) -> list[int]:
    return sorted([i.pid for i in c.actor_infos] + c.worker_pids)


def _gone(handles) -> bool:
    """Every handle's actor is dead (killed for good)."""
    for h in handles:
        try:
            ray.get(h.ping.remote(), timeout=30)
            return False
        except ray.exceptions.RayActorError:
            continue
    return True


@pytest.mark.slow
def test_parked_parties_start_the_next_cluster_of_their_layout(ray_session, tmp_path):
    from moe_runtime.runtime.cluster import Cluster

    first = make_config(tmp_path / "a", expert_actors=2, router_workers=1)
    d = first.model_dump(mode="json")
    d["model"]["router"], d["train"]["seed"] = "linear", 1  # another model and seed: nothing of `first` may remain
    d["train"]["checkpoint_dir"] = str(tmp_path / "b" / "auto")
    second = type(first).model_validate(d)
    other_layout = make_config(tmp_path / "c", expert_actors=1, router_workers=1)
    want = oracle_losses(second, 2)
    with party_pool.keep_parties() as pool:
        with Cluster.start(first) as c:
            c.train(1)
            pids = _pids(c)
        with Cluster.start(second) as c:
            assert _pids(c) == pids and c.step == 0  # the same processes, a fresh cluster
            torch.testing.assert_close(torch.tensor(c.train(2).losses), torch.tensor(want), rtol=1e-4, atol=0)
            killed = c.actor_infos[1].pid
        os.kill(killed, signal.SIGKILL)  # dies while parked (Ray restarts it): the next cluster is still exact
        with Cluster.start(second) as c:
            assert killed not in _pids(c)
            torch.testing.assert_close(torch.tensor(c.train(2).losses), torch.tensor(want), rtol=1e-4, atol=0)
            kept = c.experts + c.workers
        with Cluster.start(other_layout) as c:  # another layout: the parked ones released, new ones started
            assert c.forward(torch.zeros(1, 8, dtype=torch.long)).shape[0] == 1
            last = c.experts + c.workers
        assert _gone(kept)
        assert (pool.starts, pool.reuses) == (2, 2)  # Ray restarted the killed one in time for the re-use
    assert _gone(last)  # leaving the context released the parked cluster


def test_outside_the_context_nothing_is_parked(ray_session, tmp_path):
    from moe_runtime.runtime.launch import launch

    cfg = make_config(tmp_path, expert_actors=1, router_workers=1)
    launched = launch(cfg)
    try:
        assert party_pool.park(launched, cfg) is False and party_pool.take(cfg) is None
    finally:
        from moe_runtime.runtime.launch import release

        release(launched)
    with party_pool.keep_parties(), pytest.raises(RuntimeError, match="already active"):
        with party_pool.keep_parties():
            pass
