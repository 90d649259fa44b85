"""Elastic expert actors: add or remove expert actors on a running cluster, between steps or while serving.

Up (N > A): new actors start in free placement-group bundles (a bundle left by an earlier scale-down, else a new
placement group for the rest: one fails at once, naming what is short, when Ray has too few GPUs); the router
workers learn their addresses under the current placement (the new actors hold nothing yet); then migration
(scheduler/migrate.py) moves experts onto them, weights with AdamW state, to the even static layout over N actors.
Down (N < A): migration first drains actors N.. (their experts move to the first N, with their state), the router
workers switch to the N-actor placement, then the drained actors are killed; their bundles stay reserved for a
later scale-up (a placement group made by a scale-up is removed once all its actors are gone).
A step is a pure function of (state, step) and migration carries the whole state: losses equal a run without the
scale event.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moe_runtime.placement import Placement
from moe_runtime.runtime import party_pool
from moe_runtime.runtime.calls import START_TIMEOUT_S, get_within
from moe_runtime.runtime.ray_env import ClusterStartError
from moe_runtime.scheduler.migrate import apply_decision

if TYPE_CHECKING:
    from moe_runtime.runtime.cluster import Cluster

log = logging.getLogger(__name__)

__all__ = ["ScaleReport", "scale"]


@dataclass(frozen=True)
class ScaleReport:
    before: int  # expert actors
    after: int
    bytes_moved: int
    seconds: float
    placement_version: int

    def to_dict(self) -> dict:
        return {"before": self.before, "after": self.after, "bytes_moved": self.bytes_moved,
                "seconds": self.seconds, "placement_version": self.placement_version}  # fmt: skip


@dataclass
class _Bundles:
    """Where each expert actor runs (placement group, bundle index) and the bundles free for a scale-up."""

    of_actor: list[tuple[Any, int] | None]
    free: list[tuple[Any, int]]
    groups: list[Any]  # placement groups made by scale-ups (released with the cluster)


def _bundles(cluster: Cluster) -> _Bundles:
    b = getattr(cluster, "_bundles", None)
    if b is None:
        pg = cluster._launched.placement_group
        b = _Bundles([(pg, i) if pg is not None else None for i in range(len(cluster.experts))], [], [])
        cluster._bundles = b
    return b


def _start(cluster: Cluster, first: int, count: int) -> list[Any]:
    """`count` new expert actors with indices first.., in free bundles or a new placement group."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from moe_runtime.runtime.expert_actor import ExpertActor
    from moe_runtime.runtime.launch import _expert_bundle

    cfg, b = cluster.cfg, _bundles(cluster)
    bundle = _expert_bundle(cfg)
    slots: list[tuple[Any, int] | None] = []
    while b.free and len(slots) < count:
        slots.append(b.free.pop(0))
    more = count - len(slots)
    if more and bundle:
        party_pool.release_parked()  # a parked cluster's bundles (party_pool.keep_parties) are not in use
        free = ray.available_resources()
        short = {k: v * more for k, v in bundle.items() if v * more > free.get(k, 0.0) + 1e-9}
        if short:
            b.free[:0] = [s for s in slots if s is not None]
            raise ClusterStartError(
                f"scale to {first + count} expert actors: {more} more need {short} but only "
                f"{ {k: free.get(k, 0.0) for k in short} } are free in the Ray cluster")
        pg = placement_group([dict(bundle) for _ in range(more)], strategy=cfg.cluster.placement_strategy)
        try:
            ray.get(pg.ready(), timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            raise ClusterStartError(f"placement group of {more} x {bundle} not ready after {START_TIMEOUT_S:.0f} s")
        b.groups.append(pg)
        slots += [(pg, i) for i in range(more)]
    elif more:
        slots += [None] * more
    c = cfg.cluster
    actor_cls = ray.remote(ExpertActor)
    conf = cfg.model_dump(mode="json")
    handles = []
    for j, slot in enumerate(slots):
        opts: dict[str, Any] = {"num_gpus": c.gpus_per_expert_actor, "num_cpus": c.cpus_per_actor,
                                "max_restarts": c.max_restarts, "max_task_retries": 0}  # fmt: skip
        if slot is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group=slot[0],
                                                                           placement_group_bundle_index=slot[1])
        handles.append(actor_cls.options(**opts).remote(conf, first + j, cluster._token))
        b.of_actor.append(slot)
    return handles


def _release(cluster: Cluster, handles: list[Any], slots: list[tuple[Any, int] | None]) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    b = _bundles(cluster)
    for h in handles:
        ray.kill(h, no_restart=True)
    for slot in slots:
        if slot is not None:
            b.free.append(slot)
    for pg in list(b.groups):  # a scale-up's group with no actor left goes back to Ray
        if not any(s is not None and s[0] is pg for s in b.of_actor):
            remove_placement_group(pg)
            b.groups.remove(pg)
            b.free = [s for s in b.free if s[0] is not pg]


def _nodes(cluster: Cluster, infos: list) -> tuple[int, ...]:
    ids = sorted({i.node_id for i in infos})  # as launch numbers them
    return tuple(ids.index(i.node_id) for i in infos)


def scale(cluster: Cluster, expert_actors: int) -> ScaleReport:
    """Run `cluster` on `expert_actors` expert actors from now on (see the module docstring)."""
    if expert_actors < 1:
        raise ValueError(f"expert_actors = {expert_actors}: expected >= 1")
    t0 = time.perf_counter()
    before = len(cluster.experts)
    timeout = cluster.fleet.timeout_s
    m = cluster.cfg.model
    if expert_actors == before:
        return ScaleReport(before, before, 0, 0.0, cluster.placement.version)
    old = cluster.placement
    if expert_actors > before:
        new_handles = _start(cluster, before, expert_actors - before)
        new_infos = get_within([h.info.remote() for h in new_handles], START_TIMEOUT_S, "new expert actors starting")
        cluster.experts.extend(new_handles)  # the fleet and the launch record share this list
        cluster.actor_infos = list(cluster.actor_infos) + list(new_infos)
        nodes = _nodes(cluster, cluster.actor_infos)
        wide = Placement(expert_actors, old.replicas, old.version, nodes)  # the new actors hold nothing yet
        addresses = [i.address for i in cluster.actor_infos]
        get_within([w.set_placement.remote(wide.to_dict(), addresses) for w in cluster.workers], timeout,
                   "router workers learn the new actors")
        cluster.fleet.placement = wide
        target = Placement(expert_actors, Placement.contiguous(m.num_layers, m.num_experts, expert_actors).replicas,
                           old.version + 1, nodes)
        report = apply_decision(cluster.fleet, target)
    else:
        keep = Placement.contiguous(m.num_layers, m.num_experts, expert_actors).replicas
        drained = Placement(before, keep, old.version + 1, old.actor_nodes)  # actors expert_actors.. hold nothing
        report = apply_decision(cluster.fleet, drained)
        narrow = Placement(expert_actors, keep, drained.version, old.actor_nodes[:expert_actors])
        addresses = [i.address for i in cluster.actor_infos[:expert_actors]]
        get_within([w.set_placement.remote(narrow.to_dict(), addresses) for w in cluster.workers], timeout,
                   "router workers drop the drained actors")
        cluster.fleet.placement = narrow
        gone, b = cluster.experts[expert_actors:], _bundles(cluster)
        slots = b.of_actor[expert_actors:]
        del cluster.experts[expert_actors:]
        del b.of_actor[expert_actors:]
        cluster.actor_infos = list(cluster.actor_infos[:expert_actors])
        _release(cluster, gone, slots)
    cluster.cfg = cluster.cfg.model_copy(update={"cluster": cluster.cfg.cluster.model_copy(
        update={"expert_actors": expert_actors})})  # fmt: skip
    out = ScaleReport(before, expert_actors, report.bytes_moved, time.perf_counter() - t0, cluster.placement.version)
    log.info("scaled expert actors %d -> %d in %.2f s (%d bytes moved)", before, expert_actors, out.seconds,
             out.bytes_moved)
    return out


def release_scaled_groups(cluster: Cluster) -> None:
    """At shutdown: give back the placement groups scale-ups made (launch.release gives back the first one)."""
    from ray.util.placement_group import remove_placement_group

    b = getattr(cluster, "_bundles", None)
    for pg in b.groups if b is not None else ():
        try:
            remove_placement_group(pg)
        except Exception as err:  # noqa: BLE001  (shutdown goes on)
            log.debug("remove placement group: %s", err)
