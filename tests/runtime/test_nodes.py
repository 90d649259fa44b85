"""runtime/nodes.py on small Ray actors standing in for router workers: the rows of a dead, hung or not-yet-
repaired worker go to a live one; a worker's own error is raised as is; no live worker is a clear error."""

from __future__ import annotations

import time

import pytest
import ray

from moe_runtime.runtime.nodes import on_live_workers
from moe_runtime.runtime.recovery import ClusterError
from moe_runtime.runtime.router_worker import DataPlaneError, WorkerNotReady


@ray.remote(num_cpus=0, max_restarts=0)
class Worker:
    def __init__(self, mode: str):
        self.mode = mode

    def forward(self, part: int) -> tuple[int, str]:
        if self.mode == "hang":
            time.sleep(30)
        if self.mode == "not_ready":
            raise WorkerNotReady("router worker: no dense weights yet")
        if self.mode == "data_plane":
            raise DataPlaneError("router worker, forward: expert server x: ... UNAVAILABLE")
        return part * 10, self.mode


def _workers(*modes: str):
    ws = [Worker.remote(m) for m in modes]
    ray.get([w.__ray_ready__.remote() for w in ws], timeout=60)
    return ws


def _kill(w) -> None:
    """ray.kill returns before the actor is gone; wait (bounded) until a call on it fails, so the test's 'dead'
    worker cannot still answer its first call."""
    ray.kill(w, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get(w.__ray_ready__.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError("killed actor still answering after 30 s")


def _submit(w, i):
    return w.forward.remote(i)


def test_rows_of_dead_hung_and_unrepaired_workers_go_to_a_live_one(ray_session):
    ws = _workers("hang", "ok", "not_ready", "dead")
    _kill(ws[3])
    lost: dict[int, str] = {}
    t0 = time.monotonic()
    replies = on_live_workers(ws, [0, 1, 2, 3], _submit, 2.0, lost)
    took = time.monotonic() - t0
    assert replies == [(0, "ok"), (10, "ok"), (20, "ok"), (30, "ok")]  # in part order, all from worker 1
    assert sorted(lost) == [0, 2, 3] and lost[0] == "no answer within 2 s: hung", lost
    assert "WorkerNotReady" in lost[2] and "Actor" in lost[3]
    assert took < 2 * 2.0, took  # found within one deadline, answered within two
    for w in ws[:3]:
        ray.kill(w, no_restart=True)


def test_a_workers_own_error_is_raised_and_no_live_worker_is_named(ray_session):
    ws = _workers("data_plane", "ok", "not_ready")
    with pytest.raises(DataPlaneError, match="UNAVAILABLE"):
        on_live_workers(ws[:2], [0, 1], _submit, 5.0, {})
    lost: dict[int, str] = {}
    with pytest.raises(ClusterError, match=r"no router worker answered: router worker 0 \(RayTaskError"):
        on_live_workers(ws[2:], [0], _submit, 5.0, lost)
    for w in ws:
        ray.kill(w, no_restart=True)
