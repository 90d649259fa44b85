"""Losing router workers and whole nodes while serving and training.

A node takes every party on it at once: expert actors (their data plane is routed around by the workers,
dispatch/failover.py, and they are repaired from replicas on other nodes, runtime/failover.py; keeping a replica of
every hot expert off its other replica's node is scheduler.replica_anti_affinity: node) and router workers, which
this module covers:
- `on_live_workers`: the parts of an inference forward split over the router workers; the rows of a worker that
  died or did not answer within the deadline (hung: named in the log) are re-sent to a worker that answered, so
  the request still succeeds while one worker survives.
- `repair_workers`: a router worker Ray restarted comes back with random dense weights; it gets the dense weights
  and AdamW state of a surviving worker (every worker holds the same, data parallel) and the gloo group is formed
  again. Without a survivor the caller rolls back to a checkpoint.
- `worker_options`: router workers spread over the nodes (Ray's SPREAD), so a node's loss leaves one.
- `check_capacity`: when parties sat on a node that is gone and the nodes left cannot host every expert actor's
  bundle, a NodeLossError names the node and the lost parties at once, instead of waiting out the start timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from moe_runtime.runtime.calls import START_TIMEOUT_S, get_within
from moe_runtime.runtime.recovery import ClusterError

if TYPE_CHECKING:
    from moe_runtime.runtime.cluster import Cluster

log = logging.getLogger(__name__)

__all__ = ["NodeLossError", "check_capacity", "lost_parties", "on_live_workers", "repair_workers",
           "worker_failure", "worker_node_ids", "worker_options"]


class NodeLossError(ClusterError):
    """Parties were lost with their node and the nodes left cannot host them all."""


def worker_failure(err: BaseException) -> bool:
    """The worker itself is gone, restarting or restarted without its weights yet (not an error its forward
    raised, e.g. an expert with no replica)."""
    import ray.exceptions as rex

    from moe_runtime.runtime.router_worker import WorkerNotReady

    return isinstance(err, (rex.RayActorError, WorkerNotReady)) or isinstance(getattr(err, "cause", None),
                                                                              WorkerNotReady)  # fmt: skip


def on_live_workers(workers: Sequence[Any], indices: Sequence[int], submit: Callable[[Any, int], Any],
                    timeout_s: float, lost: dict[int, str]) -> list[Any]:  # fmt: skip
    """Replies of `submit(workers[i], i)` for every i of `indices` (part i goes to worker i unless `lost` already
    holds it). The parts of a worker that died or did not answer within `timeout_s` (hung) go again, round robin,
    to the workers that answered; `lost` collects worker -> why (the caller keeps it until a heal clears it). A
    worker's own error (e.g. a DataPlaneError) is raised as is; a ClusterError names every worker when none
    answered."""
    import ray

    out: dict[int, Any] = {}
    todo = list(indices)
    live = [w for w in range(len(workers)) if w not in lost] or list(range(len(workers)))
    targets = {i: i if i in live else live[n % len(live)] for n, i in enumerate(todo)}
    while todo:
        refs = {i: submit(workers[targets[i]], i) for i in todo}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        failed: list[int] = []
        for i, ref in refs.items():
            w = targets[i]
            try:
                out[i] = ray.get(ref, timeout=0)
            except ray.exceptions.GetTimeoutError:
                lost[w] = f"no answer within {timeout_s:.3g} s: hung"
                failed.append(i)
            except BaseException as err:
                if not worker_failure(err):
                    raise
                lost[w] = type(err).__name__
                failed.append(i)
        if failed:
            live = [w for w in range(len(workers)) if w not in lost]
            why = ", ".join(f"router worker {w} ({lost[w]})" for w in sorted(lost))
            if not live:
                raise ClusterError(f"forward: no router worker answered: {why}")
            log.warning("forward: %s; re-sending their rows to router workers %s", why, live)
            targets = {i: live[n % len(live)] for n, i in enumerate(failed)}
        todo = failed
    return [out[i] for i in indices]


def worker_node_ids(workers: Sequence[Any], timeout_s: float) -> list[str]:
    """The Ray node id of every router worker (to name what a lost node took)."""
    return [i["node_id"] for i in get_within([w.info.remote() for w in workers], timeout_s, "router worker info")]


def repair_workers(cluster: Cluster) -> list[int]:
    """Give every restarted router worker (pid changed since last seen) the dense state of a surviving one and
    form the gloo group again; returns the restarted workers. Raises ClusterError when none survived."""
    timeout = cluster.fleet.timeout_s
    pids = get_within([w.ping.remote() for w in cluster.workers], timeout, "router worker pids",
                      [f"router worker {i}" for i in range(len(cluster.workers))])  # fmt: skip
    restarted = [i for i, (new, old) in enumerate(zip(pids, cluster.worker_pids)) if new != old]
    if restarted:
        live = [i for i in range(len(cluster.workers)) if i not in restarted]
        if not live:
            raise ClusterError(f"router workers {restarted} all restarted: no surviving dense state to copy "
                               "(recover() rolls back to the last checkpoint)")  # fmt: skip
        dense = cluster.workers[live[0]].dense_state.remote()
        get_within([cluster.workers[i].load_dense.remote(dense) for i in restarted], max(timeout, START_TIMEOUT_S),
                   "dense state onto restarted router workers", [f"router worker {i}" for i in restarted])
        log.warning("router workers %s restarted: dense weights and AdamW state copied from router worker %d",
                    restarted, live[0])
    cluster.worker_pids = pids
    if restarted:
        cluster._init_collective()
    cluster.lost_workers.clear()  # every worker answers again with its weights: forwards use all of them
    cluster.worker_nodes = worker_node_ids(cluster.workers, timeout)
    return restarted


def lost_parties(cluster: Cluster) -> tuple[list[str], list[str]]:
    """(dead node ids that held parties of this cluster, the parties they held), from the last known nodes."""
    import ray

    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    where = [(f"expert actor {i.index}", i.node_id) for i in cluster.actor_infos]
    where += [(f"router worker {i}", n) for i, n in enumerate(getattr(cluster, "worker_nodes", []))]
    gone = sorted({n for _, n in where if n not in alive})
    return gone, [name for name, n in where if n in gone]


def check_capacity(cluster: Cluster) -> None:
    """Raise NodeLossError naming the lost node(s) and parties when the nodes left cannot host every expert
    actor's bundle (then no restart can bring them back: add a node or scale down)."""
    import ray

    gone, lost = lost_parties(cluster)
    if not gone:
        return
    c = cluster.cfg.cluster
    have = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("GPU", "CPU")}  # alive nodes only
    need = {"GPU": len(cluster.experts) * c.gpus_per_expert_actor,
            "CPU": (len(cluster.experts) + len(cluster.workers)) * c.cpus_per_actor}  # fmt: skip
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        what = "; ".join(f"{k}: {n:g} needed, {h:g} on the nodes left" for k, (n, h) in short.items())
        raise NodeLossError(
            f"node(s) {', '.join(g[:12] for g in gone)} lost with {', '.join(lost)}; the nodes left cannot host "
            f"them ({what}): add a node (serving goes on from live replicas meanwhile)")
    if (tuple(gone), tuple(lost)) not in _announced:  # once per loss: this runs every second while they restart
        _announced.add((tuple(gone), tuple(lost)))
        log.warning("node(s) %s lost with %s; restarting them on the nodes left", [g[:12] for g in gone], lost)


_announced: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()


def worker_options(count: int, cpus: float) -> list[dict[str, Any]]:
    """Ray options per router worker that spread them over the nodes (SPREAD), so losing one node leaves a worker
    with the dense state; as given on a single node. Ray does not spread zero-resource actors (measured: both
    workers of a 2-node cluster on one node, with SPREAD and with soft node affinity alike), so each asks for at
    least 0.001 CPU there (3 of 3 trials spread)."""
    import ray

    if len([n for n in ray.nodes() if n.get("Alive")]) < 2:
        return [{"num_cpus": cpus}] * count
    return [{"num_cpus": max(cpus, 0.001), "scheduling_strategy": "SPREAD"}] * count
