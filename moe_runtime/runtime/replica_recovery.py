"""Training through a lost party without a rollback, where replicas allow: re-run only the failed step.

Possible when the step failed before any party applied its optimizer step (runtime/step.py marks the phase), every
shard a restarted expert actor must hold has a live replica elsewhere, and at least one router worker survived
(the dense model is replicated on every worker, data parallel). Then:
  1. wait for every party (restarted ones come back empty; a surviving worker finishes or fails its in-flight
     exchange first, so no late grad lands after step 3);
  2. drop what the failed step left behind: saved activations and expert grads (actors), dense grads (workers);
  3. copy weights and AdamW state onto each restarted actor from a live replica (runtime/failover.heal) and the
     dense weights and AdamW state onto each restarted worker from a surviving one; re-form the gloo group;
  4. the caller re-runs the step. A step is a pure function of (state, step), so its losses equal a clean run's.
Anything else (a shard whose only copy died, a failure during the optimizer step, every worker lost) returns
False and the caller rolls back to the last checkpoint as before.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from moe_runtime.runtime.calls import get_within
from moe_runtime.runtime.failover import heal, repair_sources
from moe_runtime.runtime.nodes import check_capacity, worker_node_ids
from moe_runtime.runtime.party_names import names
from moe_runtime.runtime.recovery import wait_alive

if TYPE_CHECKING:
    from moe_runtime.runtime.cluster import Cluster

log = logging.getLogger(__name__)

__all__ = ["rerun_without_rollback"]


def rerun_without_rollback(cluster: Cluster, step: int) -> bool:
    """Make the parties ready to re-run `step` from live replicas; False when only a rollback can recover."""
    if cluster.fleet.phase != "forward_backward":
        return False
    t0 = time.perf_counter()
    cfg = cluster.cfg.cluster
    infos = wait_alive(cluster.experts, cluster.workers, hang_timeout_s=cfg.hang_timeout_s,
                       local=cfg.ray_address is None, expert_pids=[i.pid for i in cluster.actor_infos],
                       worker_pids=cluster.worker_pids, check=lambda: check_capacity(cluster),
                       hung=cluster.take_hung())  # fmt: skip
    timeout = cluster.fleet.timeout_s
    worker_pids = get_within([w.ping.remote() for w in cluster.workers], timeout, "router worker pids",
                             names([], cluster.workers))  # fmt: skip
    lost_workers = [i for i, (new, old) in enumerate(zip(worker_pids, cluster.worker_pids)) if new != old]
    live_workers = [i for i in range(len(cluster.workers)) if i not in lost_workers]
    restarted = [i for i, (info, old) in enumerate(zip(infos, cluster.actor_infos)) if info.pid != old.pid]
    plan = repair_sources(cluster.placement, [i.shards for i in infos])
    if plan.orphans or not live_workers:
        log.warning("step %d: %s; rolling back", step, f"shards {plan.orphans} have no live replica"
                    if plan.orphans else "every router worker was lost")  # fmt: skip
        return False
    survivors = [a for i, a in enumerate(cluster.experts) if i not in restarted]
    get_within([a.abort.remote(step) for a in survivors] + [cluster.workers[i].abort.remote() for i in live_workers],
               timeout, "aborting the failed step")  # fmt: skip
    heal(cluster, infos)  # copies onto restarted actors, re-wires every worker (builds a restarted one's model)
    if lost_workers:
        dense = cluster.workers[live_workers[0]].dense_state.remote()
        get_within([cluster.workers[i].load_dense.remote(dense) for i in lost_workers], timeout,
                   "dense state onto restarted workers", [f"router worker {i}" for i in lost_workers])
    cluster.worker_pids = worker_pids
    cluster.worker_nodes = worker_node_ids(cluster.workers, timeout)  # a restarted one may be elsewhere
    cluster._init_collective()
    log.warning("step %d: recovered from replicas in %.2f s (restarted actors %s, workers %s); re-running it",
                step, time.perf_counter() - t0, restarted, lost_workers)
    return True
