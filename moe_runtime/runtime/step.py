"""One distributed training step, as three control-plane phases around the data plane:

  A. every worker: forward + backward of its micro-batches (tokens go to the expert actors over gRPC; expert
     weight grads accumulate on the actors, dense grads on the workers);
  B. dense grads summed across workers (gloo all-reduce, or through the driver) || replicas of an expert get the
     sum of their grads (driver-mediated), then each actor reports the squared grad norm of the logical experts it
     answers for (primary replicas: a replicated expert counts once);
  C. coef = clip_coefficient(sqrt(dense_sq + expert_sq), grad_clip), lr = lr_at(step); every party scales its
     grads by coef and takes its AdamW step.
This is the oracle's step (training.InProcessTrainer) distributed: same chunks, same loss scaling, same global
norm, same AdamW; losses match it to float rounding. `attribute_timings` (pure) says where the time went.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from moe_runtime.config import RuntimeConfig
from moe_runtime.placement import Placement, ShardKey
from moe_runtime.records import ActorStepStats, StepTimings, WorkerPass
from moe_runtime.runtime.calls import get_within, step_timeout
from moe_runtime.runtime.hangs import get_with_peers
from moe_runtime.runtime.party_names import names
from moe_runtime.runtime.expert_shards import sum_replica_grads
from moe_runtime.runtime.fleet import RayExpertFleet
from moe_runtime.training import clip_coefficient, lr_at


@dataclass
class StepReport:
    step: int
    loss: float  # mean lm (cross-entropy) loss over the global batch
    aux: float  # mean aux (load-balancing) loss
    expert_load: torch.Tensor  # [L, E] token copies per expert in this step
    timings: StepTimings
    # [L, E] per chunk (chunk = worker x micro-batches + micro-batch, the order a routing trace uses): which
    # worker sent what, for recording exact traces (sim.traces); sums to expert_load
    worker_loads: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class PhaseTimes:
    """Driver wall clock at the phase boundaries of one step (perf_counter seconds)."""

    start: float
    forward_backward_done: float
    norms_done: float
    applied: float
    driver_sync_s: float  # dense grads summed through the driver (grad_sync = "ray"), else 0


def attribute_timings(phases: PhaseTimes, passes: Sequence[WorkerPass], actors: Sequence[ActorStepStats],
                      grad_sync_s: Sequence[float], grad_norm: float, clip_coef: float) -> StepTimings:  # fmt: skip
    """Where the step's time went, from what every party reported (see StepTimings for each part)."""
    w = len(passes)

    def mean(values: Sequence[float]) -> float:
        return sum(values) / w

    # actors compute concurrently and each serves every worker: the slowest actor bounds the exchanges
    expert_s = max((a.expert_compute_s for a in actors), default=0.0)
    dispatch_wall = mean([p.dispatch_s for p in passes]) + mean([p.dispatch_bwd_s for p in passes])
    combine = max(0.0, mean([p.moe_s for p in passes]) - mean([p.router_s for p in passes])
                  - mean([p.dispatch_s for p in passes]))  # fmt: skip
    grad_sync = phases.driver_sync_s + sum(grad_sync_s) / w
    fb_wall = phases.forward_backward_done - phases.start
    return StepTimings(
        step_s=phases.applied - phases.start,
        forward_backward_s=fb_wall,
        control_s=max(0.0, fb_wall - max(p.wall_s for p in passes)),
        router_s=max(0.0, mean([p.wall_s for p in passes]) - dispatch_wall - combine),
        dispatch_s=max(0.0, dispatch_wall - expert_s),
        expert_s=expert_s,
        expert_cpu_s=sum(a.expert_compute_s for a in actors),
        expert_compute_cpu_s=sum(a.expert_compute_cpu_s for a in actors),
        expert_handler_cpu_s=sum(a.expert_handler_cpu_s for a in actors),
        expert_optimizer_cpu_s=sum(a.optimizer_cpu_s for a in actors),
        worker_main_cpu_s=sum(p.main_cpu_s for p in passes),
        worker_cpu_s=sum(p.process_cpu_s for p in passes),
        combine_s=combine,
        grad_sync_s=grad_sync,
        optimizer_s=(phases.applied - phases.norms_done)
        + max(0.0, (phases.norms_done - phases.forward_backward_done) - grad_sync),
        grad_norm=grad_norm,
        clip_coef=clip_coef,
    )


def _sum_replica_grads(fleet: RayExpertFleet) -> None:
    """Every replica of a replicated expert gets the sum of all replicas' weight grads (so replicas stay equal)."""
    import ray

    placement = fleet.placement
    replicated = [((layer, e), actors) for layer, row in enumerate(placement.replicas)
                  for e, actors in enumerate(row) if len(actors) > 1]  # fmt: skip
    if not replicated:
        return
    want: dict[int, list[ShardKey]] = {}
    for k, actors in replicated:
        for a in actors:
            want.setdefault(a, []).append(k)
    got = dict(zip(want, get_within([fleet.experts[a].grads.remote(ks) for a, ks in want.items()],
                                    fleet.timeout_s, "replica grads",
                                    [f"expert actor {a}" for a in want])))  # fmt: skip
    sums = sum_replica_grads([got.get(a, {}) for a in range(placement.num_actors)], placement,
                             [k for k, _ in replicated])  # fmt: skip
    per_actor: dict[int, dict[ShardKey, tuple[torch.Tensor, torch.Tensor]]] = {}
    for k, actors in replicated:
        for a in actors:
            per_actor.setdefault(a, {})[k] = sums[k]
    refs = {a: ray.put(d) for a, d in per_actor.items()}
    get_within([fleet.experts[a].set_grads.remote(r) for a, r in refs.items()], fleet.timeout_s,
               "set replica grads")


def _sync_dense_grads(fleet: RayExpertFleet, cfg: RuntimeConfig) -> tuple[list, float]:
    """Start the dense grad sum over workers; returns the refs to await and the driver's own share of the time."""
    import ray

    workers = fleet.workers
    if cfg.cluster.grad_sync == "gloo" or len(workers) == 1:
        return [w.sync_grads.remote() for w in workers], 0.0
    t0 = time.perf_counter()  # through the driver and the object store
    flats = get_within([w.local_grads.remote() for w in workers], fleet.timeout_s, "dense grads",
                       names([], workers))
    total = flats[0].clone()
    for f in flats[1:]:
        total += f
    ref = ray.put(total)
    return [w.set_grads.remote(ref) for w in workers], time.perf_counter() - t0


def run_train_step(fleet: RayExpertFleet, cfg: RuntimeConfig, step: int) -> StepReport:
    """One optimizer step of the global batch of `step` on every party. Raises on failure (the caller recovers)."""
    t = cfg.train
    placement: Placement = fleet.placement
    t0 = time.perf_counter()
    fleet.phase = "forward_backward"  # nothing applied yet: a failure here can be cured by re-running the step
    # a worker that has not finished within hang_timeout_s of the first one is hung (runtime/hangs.py)
    passes: list[WorkerPass] = get_with_peers([w.forward_backward.remote(step) for w in fleet.workers],
                                              step_timeout(cfg), fleet.timeout_s, f"step {step} forward/backward",
                                              names([], fleet.workers))  # fmt: skip
    t1 = time.perf_counter()
    sync_refs, driver_sync = _sync_dense_grads(fleet, cfg)
    _sum_replica_grads(fleet)
    sq_refs = [a.grad_sq.remote(keys) for a, keys in zip(fleet.experts, placement.primary_shards())]
    # hang_timeout_s, not gloo's own timeout: a worker stopped in the all-reduce blocks its peers there too; the
    # recovery's ping finds the silent one and kills it, which ends its peers' all-reduce with a reset
    sync = get_within(sync_refs, fleet.timeout_s, "dense grad sync", names([], fleet.workers))
    expert_sq = sum(get_within(sq_refs, fleet.timeout_s, "expert grad norms", names(fleet.experts)))
    t2 = time.perf_counter()
    total_norm = math.sqrt(sync[0]["dense_sq"] + expert_sq)
    coef = clip_coefficient(total_norm, t.grad_clip)
    lr = lr_at(step, t)
    w = len(fleet.workers)
    fleet.phase = "apply"  # from here a failure may leave some parties stepped: only a rollback recovers
    applied = get_within([p.apply.remote(coef, lr) for p in fleet.workers]
                         + [a.apply.remote(coef, lr, step) for a in fleet.experts], fleet.timeout_s,
                         "optimizer step", names(fleet.experts, fleet.workers))  # fmt: skip
    t3 = time.perf_counter()
    fleet.phase = "done"
    timings = attribute_timings(PhaseTimes(t0, t1, t2, t3, driver_sync), passes, applied[w:],
                                [s["grad_sync_s"] for s in sync], total_norm, coef)  # fmt: skip
    load = torch.from_numpy(np.sum([p.load_le for p in passes], axis=0, dtype=np.int64))
    chunk_loads = [torch.tensor(c) for p in passes for c in p.chunk_loads_le]  # Ray hands read-only arrays
    return StepReport(step, sum(p.lm for p in passes), sum(p.aux for p in passes), load, timings, chunk_loads)
