"""What-if studies on the simulator.

``rebalance_whatif``: the static placement (``static_placement``: ``Placement.contiguous``, or one expert per
actor per layer when there are more actors than experts) against the scheduler's placement for the trace's load:
``scheduler.policy.decide`` on a ``LoadSnapshot`` built by ``scheduler.load.LoadTracker`` (the runtime's EMA, with
``scheduler.ema_decay``) over the trace's steps. Both placements are simulated on every step of the trace; the
result reports both mean step times and the speed-up.

Capacities: ``scheduler.slots_per_actor`` replicas per actor per layer (None = ceil(E / A) + 1, one spare
slot), ``bytes_per_expert`` = ``model.accounting.expert_state_bytes`` (what an actor holds and moves); the other
policy parameters from ``SchedulerConfig`` (``PolicyParams.from_config``) except the byte budget, which is
unlimited here (the steady-state placement the scheduler converges to); the bytes that placement costs to reach
are reported, with the time to move them over one inter-node link.

``overlap_whatif``: transport.overlap none against two_batch on the same trace (`--what-if overlap`): the plain
step, the two halves pipelined (sim/two_batch.py), and two references that separate what splitting costs from
what overlapping gains: the halves run one after the other as two micro-batches (``split_sequential_step_s``)
and the sum of the parts (each half's forward + backward alone, added, plus the step's boundary:
``sum_of_parts_step_s``).

``scaling``: the step time of one trace shape on clusters of several sizes (for the plot).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_runtime.config import SchedulerConfig
from moe_runtime.model.accounting import expert_state_bytes
from moe_runtime.placement import Placement
from moe_runtime.scheduler.load import LoadTracker
from moe_runtime.scheduler.policy import Capacities, PlacementDecision, PolicyParams, decide
from moe_runtime.sim.cost_model import CostModel
from moe_runtime.sim.layout import Layout
from moe_runtime.sim.results import summarize
from moe_runtime.sim.simulator import Simulator
from moe_runtime.sim.traces import RoutingTrace

__all__ = ["WhatIfResult", "overlap_whatif", "rebalance_whatif", "scaling", "scheduler_placement"]

@dataclass
class WhatIfResult:
    static_step_s: float
    rebalanced_step_s: float
    speedup: float  # static / rebalanced
    static_imbalance: float
    rebalanced_imbalance: float
    changed: bool
    reason: str
    bytes_to_move: int
    move_time_s: float  # bytes_to_move over one inter-node link (a lower bound on the migration stall)
    steps: int
    static: dict[str, Any] = field(default_factory=dict)  # summarize() of the static runs
    rebalanced: dict[str, Any] = field(default_factory=dict)
    placement: Placement | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("placement", "static", "rebalanced")}
        out["replica_counts"] = self.placement.replica_counts() if self.placement is not None else None
        return out


def scheduler_placement(sim: Simulator, trace: RoutingTrace, static: Placement, cfg: SchedulerConfig,
                        steps: int) -> PlacementDecision:  # fmt: skip
    """The scheduler policy's decision for the trace's load (EMA over `steps` steps, as the runtime tracks it)."""
    m = sim.cost.model
    tracker = LoadTracker(m.num_layers, m.num_experts, decay=cfg.ema_decay, record=False)
    for s in range(steps):
        tracker.update(s, trace.load([s]))
    A = static.num_actors
    slots = cfg.slots_per_actor or math.ceil(m.num_experts / A) + 1
    caps = Capacities(
        slots_per_actor=slots,
        bytes_per_expert=expert_state_bytes(m),
        actor_nodes=static.actor_nodes or sim.layout.actor_nodes(),
    )
    params = dataclasses.replace(PolicyParams.from_config(cfg), byte_budget=None)  # steady state: no byte budget
    return decide(tracker.snapshot(), static, caps, params)


def rebalance_whatif(sim: Simulator, trace: RoutingTrace, steps: int | None = None,
                     cfg: SchedulerConfig | None = None, static: Placement | None = None) -> WhatIfResult:  # fmt: skip
    sim.check_trace(trace)
    cfg = cfg or SchedulerConfig()
    steps = trace.num_steps if steps is None else steps
    static = static or sim.default_placement()
    decision = scheduler_placement(sim, trace, static, cfg, steps)
    s_runs = summarize(sim.run(trace, steps, static))
    r_runs = summarize(sim.run(trace, steps, decision.placement)) if decision.changed else s_runs
    inter = sim.cost.links["inter_node"]
    return WhatIfResult(
        static_step_s=s_runs["step_time_s"],
        rebalanced_step_s=r_runs["step_time_s"],
        speedup=s_runs["step_time_s"] / r_runs["step_time_s"],
        static_imbalance=s_runs["imbalance"],
        rebalanced_imbalance=r_runs["imbalance"],
        changed=decision.changed,
        reason=decision.reason,
        bytes_to_move=int(decision.bytes_to_move),
        move_time_s=decision.bytes_to_move / inter.bandwidth,
        steps=steps,
        static=s_runs,
        rebalanced=r_runs,
        placement=decision.placement,
    )


def overlap_whatif(sim: Simulator, trace: RoutingTrace, steps: int | None = None,
                   placement: Placement | None = None) -> dict[str, Any]:  # fmt: skip
    """Overlap none vs two_batch on every step of the trace (module docstring). ``overlap_vs_none_step_time`` =
    two_batch / none (mean step times); ``splittable`` False (ratio 1) when a micro-batch has < 2 rows."""
    sim.check_trace(trace)
    steps = trace.num_steps if steps is None else steps
    kw = {"micro_batches": sim.micro_batches, "training": sim.training}
    none = Simulator(sim.cost, sim.layout, overlap="none", **kw)
    two = Simulator(sim.cost, sim.layout, overlap="two_batch", **kw)
    halves = two.halves(trace.step(0), None if trace.token_counts is None else trace.token_counts[0])
    out: dict[str, Any] = {"steps": steps, "splittable": halves is not None}
    r_none = summarize(none.run(trace, steps, placement))
    out["none_step_s"] = r_none["step_time_s"]
    if halves is None:
        rows = float(trace.tokens()[0].min()) / sim.cost.seq_len
        out.update(two_batch_step_s=r_none["step_time_s"], overlap_vs_none_step_time=1.0,
                   reason=f"{rows:g} row(s) of {sim.cost.seq_len} tokens per micro-batch: the runtime splits a "
                          "micro-batch by rows and runs one of fewer than 2 rows whole")  # fmt: skip
        return out
    runs_two = two.run(trace, steps, placement)
    r_two = summarize(runs_two)
    seq = Simulator(sim.cost, sim.layout, overlap="none", micro_batches=2 * sim.micro_batches, training=sim.training)
    seq_s, parts_s = [], []
    for s in range(steps):
        tok = None if trace.token_counts is None else trace.token_counts[s % trace.num_steps]
        h = two.halves(trace.step(s), tok)
        seq_s.append(seq.run_step(h.counts_cle, placement, tokens_c=h.tokens_c).step_time_s)
        fb = 0.0
        for m in range(h.micro_batches):  # each half alone: a one-micro-batch step of the plain schedule
            one = Simulator(sim.cost, sim.layout, overlap="none", training=sim.training)
            r = one.run_step(h.counts_cle[m :: h.micro_batches], placement, tokens_c=h.tokens_c[m :: h.micro_batches])
            fb += r.phases["forward_backward_s"]
        r2 = runs_two[s]  # the step boundary (sync, optimizer, overhead) is the same for the parts
        parts_s.append(fb + r2.step_time_s - r2.phases["forward_backward_s"])
    out.update(
        two_batch_step_s=r_two["step_time_s"],
        overlap_vs_none_step_time=r_two["step_time_s"] / r_none["step_time_s"],
        split_sequential_step_s=float(np.mean(seq_s)),
        sum_of_parts_step_s=float(np.mean(parts_s)),
        split_vs_none_step_time=float(np.mean(seq_s)) / r_none["step_time_s"],  # what splitting alone costs
        overlap_vs_split_step_time=r_two["step_time_s"] / float(np.mean(seq_s)),  # what overlapping gains
        forward_backward_s={"none": r_none["phases"]["forward_backward_s"],
                            "two_batch": r_two["phases"]["forward_backward_s"]},
        gpu_busy_mean={"none": r_none["gpu_busy_mean"], "two_batch": r_two["gpu_busy_mean"]},
        messages_per_step={"none": r_none["messages_per_step"], "two_batch": r_two["messages_per_step"]},
    )  # fmt: skip
    return out


def scaling(cost: CostModel, gpus: list[int], gpus_per_node: int, kind: str = "zipf", zipf_s: float = 1.0,
            tokens_per_worker: int = 4096, training: bool = True, seed: int = 0) -> list[dict[str, float]]:  # fmt: skip
    """Step time of the co-located layout on each cluster size (static placement, one synthetic step)."""
    out = []
    for g in gpus:
        sim = Simulator(cost, Layout.colocated(g, gpus_per_node), training=training)
        trace = sim.synthetic(kind, steps=1, tokens_per_worker=tokens_per_worker, zipf_s=zipf_s, seed=seed)
        r = sim.run_step(trace.step(0))
        tokens = g * tokens_per_worker
        out.append({"gpus": g, "step_time_s": r.step_time_s, "tokens_per_s": tokens / r.step_time_s,
                    "imbalance": r.imbalance, "gpu_busy_mean": float(np.mean(r.gpu_busy_fraction))})  # fmt: skip
    return out
