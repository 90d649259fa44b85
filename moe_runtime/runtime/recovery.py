"""Faults: which errors a restart and rollback can cure, and bringing every party back after one.

An expert actor or router worker process dies (killed, OOM, segfault) during a step or a checkpoint save: the
failed call surfaces as RayActorError / ExpertCallError; Ray restarts the actor (cluster.max_restarts) in its
placement-group bundle; the driver waits for every party to answer, re-wires the router workers to the new gRPC
addresses, re-forms the gloo group and rolls *every* party back to the last automatic checkpoint (Cluster.train).
"""

from __future__ import annotations

import time
from typing import Any

from moe_runtime.dispatch.client import ExpertCallError
from moe_runtime.records import ActorInfo
from moe_runtime.runtime.calls import CONTROL_TIMEOUT_S, START_TIMEOUT_S, get_within
from moe_runtime.runtime.router_worker import DataPlaneError


class ClusterError(RuntimeError):
    """A cluster operation failed and could not be recovered."""


def is_fault(err: BaseException) -> bool:
    """A party died or the data plane failed: recoverable by restart + rollback."""
    import ray.exceptions as rex

    seen = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (rex.RayActorError, rex.GetTimeoutError, ExpertCallError, DataPlaneError,
                          rex.ObjectLostError)):
            return True
        if isinstance(e, rex.RayTaskError) and isinstance(e.cause, (ExpertCallError, DataPlaneError)):
            return True
        e = e.__cause__ or getattr(e, "cause", None)
    return False


def wait_alive(experts: list[Any], workers: list[Any], timeout: float = START_TIMEOUT_S) -> list[ActorInfo]:
    """Ping every party until it answers (restarted actors come back empty); returns fresh expert infos."""
    import ray

    deadline = time.monotonic() + timeout
    for h in workers + experts:
        while True:
            try:
                ray.get(h.ping.remote(), timeout=max(1.0, min(30.0, deadline - time.monotonic())))
                break
            except ray.exceptions.ActorDiedError as err:
                raise ClusterError(f"an actor died for good (max_restarts exhausted): {err}") from err
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                if time.monotonic() > deadline:
                    raise ClusterError(f"actors did not come back within {timeout:.0f} s") from err
                time.sleep(0.2)
    return get_within([a.info.remote() for a in experts], CONTROL_TIMEOUT_S, "expert actor info")
