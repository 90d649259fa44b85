"""Bringing a restarted or half-updated expert actor back into the placement without a rollback, where the state
it lacks is still alive somewhere.

An actor is *broken* when what it holds differs from what the placement says (a restart comes back with no shards
and placement version 0; a failed migration may leave extra shards or another version). `repair_sources` (pure)
picks, for each shard a broken actor must hold, a live replica on a healthy actor to copy it from (weights and
AdamW state: the replicas are identical at a step boundary); shards with no such replica are *orphans*.
`heal` copies from the sources; orphans come from the last checkpoint when it was taken at the current step (the
state is then the same), else the whole cluster rolls back to it (Cluster._recover). Finally every router worker
is re-wired to the actors' addresses and placement (which also clears the actors its forwards found down).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moe_runtime.placement import Placement, ShardKey
from moe_runtime.records import ActorInfo

if TYPE_CHECKING:
    from moe_runtime.runtime.cluster import Cluster

log = logging.getLogger(__name__)

__all__ = ["HealReport", "RepairPlan", "broken_actors", "degraded_pairs", "heal", "masked_now", "repair_sources"]


@dataclass(frozen=True)
class HealReport:
    broken: tuple[int, ...]  # actors that did not hold what the placement says
    from_replicas: tuple[int, ...]  # repaired by copying from live replicas
    from_checkpoint: tuple[int, ...]  # repaired from a checkpoint of the current step
    rolled_back: bool  # the whole cluster went back to the last checkpoint (an orphan and an older checkpoint)
    rewired: bool  # the router workers got new addresses / placement
    seconds: float

    def to_dict(self) -> dict:
        return {"broken": list(self.broken), "from_replicas": list(self.from_replicas),
                "from_checkpoint": list(self.from_checkpoint), "rolled_back": self.rolled_back,
                "rewired": self.rewired, "seconds": self.seconds}  # fmt: skip


def broken_actors(infos: Sequence[ActorInfo], placement: Placement) -> list[int]:
    """Actors whose shards or placement version differ from `placement`'s."""
    return [i for i, info in enumerate(infos)
            if sorted(tuple(k) for k in info.shards) != placement.shards_of(i)
            or info.placement_version != placement.version]  # fmt: skip


@dataclass(frozen=True)
class RepairPlan:
    copies: dict[int, dict[ShardKey, int]]  # actor -> shard it lacks -> an actor holding it now (round robin)
    drops: dict[int, list[ShardKey]]  # actor -> shards it holds but the placement does not give it
    orphans: dict[int, list[ShardKey]]  # actor -> shards it lacks that no actor holds


def repair_sources(placement: Placement, held: Sequence[Sequence[ShardKey]]) -> RepairPlan:
    """What makes every actor hold exactly its shards of `placement`, given what each holds now (`held[a]`).
    A held shard is current state (all replicas are equal at a step boundary), so any holder is a source."""
    holders: dict[ShardKey, list[int]] = {}
    for a, keys in enumerate(held):
        for k in keys:
            holders.setdefault((int(k[0]), int(k[1])), []).append(a)
    copies: dict[int, dict[ShardKey, int]] = {}
    drops: dict[int, list[ShardKey]] = {}
    orphans: dict[int, list[ShardKey]] = {}
    turn = 0
    for a in range(placement.num_actors):
        want, have = set(placement.shards_of(a)), {(int(k[0]), int(k[1])) for k in held[a]}
        for k in sorted(want - have):
            src = [b for b in holders.get(k, []) if b != a]
            if src:
                copies.setdefault(a, {})[k] = src[turn % len(src)]
                turn += 1
            else:
                orphans.setdefault(a, []).append(k)
        if have - want:
            drops[a] = sorted(have - want)
    return RepairPlan(copies, drops, orphans)


def heal(cluster: Cluster, infos: Sequence[ActorInfo]) -> HealReport:
    """Repair every broken actor of `cluster` (infos: fresh, from recovery.wait_alive) and re-wire the workers."""
    from moe_runtime.checkpoint import training_state as ckpt
    from moe_runtime.runtime.calls import START_TIMEOUT_S, get_within

    t0 = time.perf_counter()
    placement = cluster.placement
    broken = broken_actors(infos, placement)
    plan = repair_sources(placement, [i.shards for i in infos])
    timeout = cluster.fleet.timeout_s
    from_ckpt: list[int] = []
    if plan.orphans:
        d = cluster.last_checkpoint
        same_step = False
        if d is not None:
            try:
                same_step = ckpt.load_manifest(d, verify=True).step == cluster.step
            except ckpt.CheckpointError as err:
                log.warning("last checkpoint %s unusable for repair: %s", d, err)
        if not same_step:
            log.warning("shards %s have no live replica and the last checkpoint is not of step %d: rolling back",
                        plan.orphans, cluster.step)
            cluster._recover(d.parent if d is not None else cluster.default_checkpoint_root())
            return HealReport(tuple(broken), (), (), True, True, time.perf_counter() - t0)
        from_ckpt = sorted(plan.orphans)  # these load every shard of theirs from the checkpoint (same state)
        get_within([cluster.experts[a].load_checkpoint.remote(str(d), placement.shards_of(a), placement.version)
                    for a in from_ckpt], timeout, "repair from checkpoint",
                   [f"expert actor {a}" for a in from_ckpt])  # fmt: skip
    copied = sorted(a for a in plan.copies if a not in plan.orphans)
    if copied:
        by_src: dict[int, list[ShardKey]] = {}
        for a in copied:
            for k, src in plan.copies[a].items():
                if k not in by_src.setdefault(src, []):
                    by_src[src].append(k)
        got = cluster.fleet.read_shards(by_src)
        refs = [cluster.experts[a].load_shards.remote({k: got[src][k] for k, src in plan.copies[a].items()},
                                                      placement.version, replace=False) for a in copied]
        get_within(refs, timeout, "repair from replicas", [f"expert actor {a}" for a in copied])
    dropping = {a: ks for a, ks in plan.drops.items() if a not in plan.orphans}
    if dropping:
        cluster.fleet.drop_shards(dropping)
    get_within([a.set_placement_version.remote(placement.version) for a in cluster.experts], timeout,
               "placement version", [f"expert actor {i}" for i in range(len(cluster.experts))])
    addresses = [i.address for i in infos]
    # a router worker Ray restarted builds its model in this call, like at start (it answered a ping just now)
    get_within([w.set_placement.remote(placement.to_dict(), addresses) for w in cluster.workers],
               max(timeout, START_TIMEOUT_S), "re-wiring router workers",
               [f"router worker {i}" for i in range(len(cluster.workers))])  # fmt: skip
    cluster.actor_infos = list(infos)
    report = HealReport(tuple(broken), tuple(copied), tuple(from_ckpt), False, True, time.perf_counter() - t0)
    if broken:
        log.warning("healed expert actors %s in %.2f s (from replicas %s, from checkpoint %s)", broken,
                    report.seconds, copied, from_ckpt)
    return report


def degraded_pairs(replies: Sequence[dict], key: str = "seen") -> list[list[int]]:
    """The (layer, expert) pairs some router worker masked (RouterWorker.degraded replies), sorted, unique."""
    return [list(p) for p in sorted({(int(la), int(e)) for r in replies for la, e in r[key]})]


def masked_now(workers: Sequence, timeout_s: float = 10.0) -> list[list[int]]:
    """The (layer, expert) pairs the router workers exclude from routing now; a worker that does not answer
    counts as none (status() reports it unreachable)."""
    import ray

    replies = []
    for w in workers:
        try:
            replies.append(ray.get(w.degraded.remote(False), timeout=timeout_s))
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            continue
    return degraded_pairs(replies, "masked")


def actor_status(cluster: Cluster, timeout_s: float = 10.0) -> list[dict]:
    """Per expert actor what it really holds and whether the data plane reaches it: `health` is "ok" only when
    it answers, holds exactly its shards of the placement at the placement's version and serves at the address
    the router workers use; else it says what is wrong."""
    import ray

    from moe_runtime.dispatch.client import ExpertCallError, ExpertClient

    placement = cluster.placement
    wired = [i.address for i in cluster.actor_infos]
    out = []
    for i, a in enumerate(cluster.experts):
        try:
            s = ray.get(a.stats.remote(), timeout=timeout_s)
            tokens = ray.get(a.token_counts.remote(), timeout=timeout_s)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as err:
            out.append({"index": i, "health": f"unreachable: {type(err).__name__}", "reachable": False})
            continue
        shards = sorted(tuple(k) for k in s["shards"])
        want = placement.shards_of(i)
        problems = []
        if shards != want:
            problems.append(f"holds {len(shards)} shards, the placement gives it {len(want)}"
                            + (f" (missing {sorted(set(want) - set(shards))[:4]})" if set(want) - set(shards)
                               else ""))  # fmt: skip
        if s["placement_version"] != placement.version:
            problems.append(f"at placement version {s['placement_version']}, the cluster at {placement.version}")
        if i < len(wired) and s["address"] != wired[i]:
            problems.append(f"serves at {s['address']} but the router workers call {wired[i]}")
        try:
            with ExpertClient(s["address"], cluster._token, timeout_s) as client:
                client.health()
            reachable = True
        except ExpertCallError as err:
            reachable = False
            problems.append(f"data plane unreachable: {err}")
        out.append({**s, "shards": [list(k) for k in shards], "tokens": sum(tokens.values()),
                    "reachable": reachable, "health": "ok" if not problems else "degraded: " + "; ".join(problems)})
    return out
