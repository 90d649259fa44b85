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

__all__ = ["WhatIfResult", "rebalance_whatif", "scaling", "scheduler_placement"]

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
