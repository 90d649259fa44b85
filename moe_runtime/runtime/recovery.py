"""Faults: which errors a restart and rollback can cure, and bringing every party back after one.

An expert actor or router worker process dies (killed, OOM, segfault) during a step or a checkpoint save: the
failed call surfaces as RayActorError / ExpertCallError / DataPlaneError, or, when a router worker dies inside the
dense-grad all-reduce, as the surviving worker's CollectiveError (gloo's "Connection reset by peer" reaches the
driver before Ray reports the dead worker). Ray restarts the actor (cluster.max_restarts) in its placement-group
bundle; the driver waits for every party to answer, re-wires the router workers to the new gRPC addresses,
re-forms the gloo group and rolls *every* party back to the last automatic checkpoint (Cluster.train).

Hangs are deaths detected by deadline: a party that does not answer a control call within cluster.hang_timeout_s
(GetTimeoutError naming it) or a data-plane call within transport.deadline_s is pinged; one that does not answer
the ping within the same deadline is killed (Ray restarts it) and recovered like a dead one. A party the fault
already caught past a deadline (runtime/hung_parties.py) gets one short ping (HUNG_PING_S) instead.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from moe_runtime.dispatch.client import ExpertCallError
from moe_runtime.records import ActorInfo
from moe_runtime.runtime.calls import CONTROL_TIMEOUT_S, START_TIMEOUT_S, get_within
from moe_runtime.runtime.hung_parties import error_chain
from moe_runtime.runtime.party_names import names
from moe_runtime.runtime.router_worker import CollectiveError, DataPlaneError

log = logging.getLogger(__name__)

_FAULT_CAUSES = (ExpertCallError, DataPlaneError, CollectiveError)


class ClusterError(RuntimeError):
    """A cluster operation failed and could not be recovered."""


def is_fault(err: BaseException) -> bool:
    """A party died, hung or the data plane / the collective failed: recoverable by restart + rollback."""
    import ray.exceptions as rex
    import torch.distributed as dist

    faults = (rex.RayActorError, rex.GetTimeoutError, rex.ObjectLostError, dist.DistError) + _FAULT_CAUSES
    return any(isinstance(e, faults) for e in error_chain(err))


@dataclass(frozen=True)
class Party:
    """One actor the driver drives, named for error messages; `pid` as last seen (to kill it when hung)."""

    name: str  # "expert actor 2" | "router worker 0"
    handle: Any
    pid: int | None = None


def parties(experts: Sequence[Any], workers: Sequence[Any], expert_pids: Sequence[int | None] = (),
            worker_pids: Sequence[int | None] = ()) -> list[Party]:  # fmt: skip
    """Router workers first, then expert actors (the order wait_alive pings them)."""
    ep, wp = list(expert_pids), list(worker_pids)
    return ([Party(f"router worker {i}", h, wp[i] if i < len(wp) else None) for i, h in enumerate(workers)]
            + [Party(f"expert actor {i}", h, ep[i] if i < len(ep) else None) for i, h in enumerate(experts)])


def _kill(p: Party, local: bool) -> None:
    """Kill a hung party so Ray restarts it. A SIGSTOPped process cannot act on Ray's kill request; in local mode
    the driver shares the machine and SIGKILLs the pid it last saw (SIGKILL works on a stopped process)."""
    import ray

    try:
        ray.kill(p.handle, no_restart=False)
    except ValueError as err:
        log.debug("kill %s: %s", p.name, err)
    if local and p.pid:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


HUNG_PING_S = 1.0  # a party already caught past a deadline: killed unless it answers this soon (a live one: ms)
_RESEND_S = 0.25  # how often a restarting party is pinged again
_MAX_PINGS = 8  # pings kept in flight per party (older ones are dropped, their answers not needed)
_RAY_FAILS_S = 3.0  # a ping to a party Ray is restarting fails within this (measured 1.5-2.0 s, Ray 2.5x)


def _poll(refs: list[Any], done: set[str]) -> tuple[str, str]:
    """('alive' | 'died' (for good, the error) | 'failed' (every finished ping failed: Ray is restarting the party;
    those pings are removed from `refs`) | 'waiting', detail)."""
    import ray

    failed = False
    for ref in [r for r in refs if r.hex() in done]:
        try:
            ray.get(ref)
            return "alive", ""
        except ray.exceptions.ActorDiedError as err:
            return "died", str(err)
        except ray.exceptions.RayActorError:
            refs.remove(ref)
            failed = True
    return ("failed" if failed else "waiting"), ""


def wait_alive(experts: list[Any], workers: list[Any], timeout: float = START_TIMEOUT_S, *,
               hang_timeout_s: float = CONTROL_TIMEOUT_S, local: bool = False,
               expert_pids: Sequence[int | None] = (), worker_pids: Sequence[int | None] = (),
               check: Callable[[], None] | None = None, hung: Collection[str] = ()) -> list[ActorInfo]:  # fmt: skip
    """Ping every party until it answers (restarted actors come back empty); returns fresh expert infos.
    `check` runs about once a second while parties are missing and raises to give up early (nodes.check_capacity:
    their node is gone and the nodes left cannot host them).

    A party whose process is alive but does not answer a ping within `hang_timeout_s` is hung: it is killed once
    (Ray restarts it) and waited for again; `hung` names parties a deadline already caught (hung_parties.py),
    killed after min(HUNG_PING_S, hang_timeout_s) of silence instead. Raises ClusterError naming every party
    that did not come back within `timeout` (e.g. its node is gone and no bundle is left for it) or that died
    for good."""
    import ray

    t0 = time.monotonic()
    deadline = t0 + timeout
    todo = parties(experts, workers, expert_pids, worker_pids)
    killed: set[str] = set()
    restarting: set[str] = set()  # a ping of theirs failed: Ray is restarting them
    since: dict[str, float] = {p.name: t0 for p in todo}  # when each was first asked, or last seen failing
    sent: dict[str, float] = {p.name: t0 for p in todo}  # when its newest ping was sent
    refs = {p.name: [p.handle.ping.remote()] for p in todo}  # its pings in flight, oldest first
    dead: list[str] = []
    last_check = t0
    while todo:
        flying = [r for p in todo for r in refs[p.name]]
        ready, _ = ray.wait(flying, num_returns=len(flying), timeout=0.2)
        done = {r.hex() for r in ready}
        now = time.monotonic()
        left = []
        for p in todo:
            state, detail = _poll(refs[p.name], done)
            if state == "alive":
                continue
            if state == "died":
                dead.append(f"{p.name}: {detail}")
                continue
            if state == "failed":
                restarting.add(p.name)
                since[p.name] = now
            if p.name in restarting and (not refs[p.name] or now - sent[p.name] >= _RESEND_S):
                # a ping sent while Ray restarts a party waits out Ray's own ~2 s before it fails, even when the
                # party is back sooner: ask again every _RESEND_S, the first answer counts
                refs[p.name] = [*refs[p.name][1 - _MAX_PINGS:], p.handle.ping.remote()]
                sent[p.name] = now
            quiet_s = min(HUNG_PING_S, hang_timeout_s) if p.name in hung else hang_timeout_s
            quiet_s = max(quiet_s, _RAY_FAILS_S) if p.name in restarting else quiet_s
            if now - since[p.name] > quiet_s and p.name not in killed:  # neither answered nor failed: hung
                log.warning("%s did not answer a ping within %.3g s%s: hung, killing it", p.name, quiet_s,
                            " (a deadline caught it already)" if p.name in hung else "")  # fmt: skip
                _kill(p, local)
                killed.add(p.name)
                restarting.add(p.name)
                since[p.name] = now
            left.append(p)
        todo = left
        if todo and check is not None and now - last_check >= 1.0:
            last_check = now
            check()
        if todo and now > deadline:
            break
    if dead:
        raise ClusterError("parties died for good (max_restarts exhausted): " + "; ".join(dead))
    if todo:
        who = ", ".join(p.name + (" (killed as hung)" if p.name in killed else "") for p in todo)
        raise ClusterError(
            f"{who} did not come back within {timeout:.0f} s: their node may be gone with no free resources to "
            "restart them on (a placement-group bundle lives on one node)"
        )
    try:
        return get_within([a.info.remote() for a in experts], CONTROL_TIMEOUT_S, "expert actor info",
                          names(experts))  # fmt: skip
    except ray.exceptions.ActorDiedError:
        raise
    except ray.exceptions.RayActorError:  # one restarted (again) between its ping and this call: wait once more
        left = deadline - time.monotonic()
        if left <= 0:
            raise
        return wait_alive(experts, workers, left, hang_timeout_s=hang_timeout_s, local=local,
                          expert_pids=expert_pids, worker_pids=worker_pids, check=check, hung=hung)
