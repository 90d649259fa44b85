"""Which parties a fault already showed to be hung, so recovery kills them after one short ping.

Recovery pings every party and kills one that stays silent for cluster.hang_timeout_s (recovery.wait_alive). A
party that a deadline has already caught has been silent that long, or longer, so a second full wait only delays
its restart. Each such party has been silent with evidence:
- an expert actor whose data-plane call ran past transport.deadline_s (DEADLINE_EXCEEDED, named by its server
  address) while serving or training;
- a router worker that did not finish its step within hang_timeout_s of its first peer (hangs.get_with_peers), or
  did not answer a forward within hang_timeout_s (nodes.on_live_workers: its rows went to another worker).
A dead party's ping fails at once, and a live one answers within the short ping, so neither is affected. Silence
in a control call (calls.get_within) is not counted: a long checkpoint save looks the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from moe_runtime.records import ActorInfo

__all__ = ["error_chain", "from_fault", "from_forward", "late_address", "still_hung", "HUNG_ATTR"]

HUNG_ATTR = "hung_parties"  # an error's attribute: the party names its deadline caught (hangs.get_with_peers)
_DEADLINE = "DEADLINE_EXCEEDED"


def error_chain(err: BaseException) -> Iterator[BaseException]:
    """err, its causes, and what Ray wrapped (RayTaskError.cause), each once (recovery.is_fault walks it too)."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException) and id(cause) not in seen:
            yield from error_chain(cause)
        e = e.__cause__


def _experts_at(addresses: set[str], infos: Sequence[ActorInfo]) -> set[str]:
    return {f"expert actor {i.index}" for i in infos if i.address in addresses}


def late_address(err: BaseException) -> str | None:
    """The server address of an ExpertCallError past its deadline, else None."""
    from moe_runtime.dispatch.client import ExpertCallError

    late = isinstance(err, ExpertCallError) and err.code is not None and err.code.name == _DEADLINE
    return err.address if late else None


def from_fault(err: BaseException, infos: Sequence[ActorInfo]) -> set[str]:
    """Names ("expert actor 2", "router worker 1") of the parties `err` caught past a deadline."""
    named: set[str] = set()
    addresses: set[str] = set()
    for e in error_chain(err):
        named.update(getattr(e, HUNG_ATTR, ()) or ())
        # an ExpertCallError here, or router_worker.DataPlaneError's copy of its address across Ray
        address = late_address(e) or getattr(e, "hung_address", None)
        if isinstance(address, str):
            addresses.add(address)
    return named | _experts_at(addresses, infos)


def from_forward(down: Mapping[int, str], lost_workers: Mapping[int, str]) -> set[str]:
    """Names of the parties a forward caught past a deadline: expert actors the workers found down with
    DEADLINE_EXCEEDED (dispatch.failover: "CODE: details"), router workers that did not answer in time."""
    return ({f"expert actor {a}" for a, why in down.items() if why.startswith(_DEADLINE)}
            | {f"router worker {w}" for w, why in lost_workers.items() if why.endswith("hung")})  # fmt: skip


def still_hung(caught: Mapping[str, int | None], pids_now: Mapping[str, int | None]) -> set[str]:
    """The parties of `caught` (name -> pid when caught) still in that process: a forward made while a heal ran
    reports what the workers found before it, and a party restarted since is no longer the hung one."""
    return {name for name, pid in caught.items() if pid is not None and pids_now.get(name) == pid}
