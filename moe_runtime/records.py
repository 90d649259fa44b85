"""Typed records that cross process boundaries: what an expert actor says about itself, what a router worker and
an expert actor report for one training step, and the step timings the driver attributes from them.

Bottom layer: plain data (numpy for load matrices), no torch, Ray or gRPC, so every layer can read them and
Ray pickles them as they are. `as_dict()` gives the JSON form the CLI prints (field names are a contract).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np


@dataclass(frozen=True)
class ActorInfo:
    """An expert actor's identity: where it runs and where its gRPC server listens."""

    index: int
    pid: int
    node_id: str
    address: str
    gpu_ids: tuple[str, ...]
    device: str
    shards: tuple[tuple[int, int], ...]
    placement_version: int

    def as_dict(self) -> dict:
        d = asdict(self)
        d["gpu_ids"], d["shards"] = list(self.gpu_ids), [list(k) for k in self.shards]
        return d


@dataclass(frozen=True)
class WorkerPass:
    """One router worker's forward + backward of its micro-batches of a step.

    lm / aux: this worker's share of the global mean losses (chunk means / chunks). Walls are seconds summed over
    the MoE layers (module hooks): moe_s (the whole layer), router_s, dispatch_s (forward exchange),
    dispatch_bwd_s (backward exchange). CPU: the main thread and the whole process.
    """

    lm: float
    aux: float
    load_le: np.ndarray  # [L, E] token copies per expert, this worker's micro-batches summed
    chunk_loads_le: tuple[np.ndarray, ...]  # one [L, E] per micro-batch, in order
    wall_s: float
    main_cpu_s: float
    process_cpu_s: float
    moe_s: float = 0.0
    router_s: float = 0.0
    dispatch_s: float = 0.0
    dispatch_bwd_s: float = 0.0


@dataclass(frozen=True)
class ActorStepStats:
    """What an expert actor did in one step: its optimizer phase, and its request handlers' time since the last
    step (compute wall and CPU, the handler thread's CPU, decode and encode)."""

    optimizer_s: float
    optimizer_cpu_s: float
    expert_compute_s: float = 0.0
    expert_compute_cpu_s: float = 0.0
    expert_handler_cpu_s: float = 0.0
    expert_decode_s: float = 0.0
    expert_encode_s: float = 0.0


@dataclass(frozen=True)
class StepTimings:
    """Where one training step's time went (seconds). Concurrent parties overlap, so the parts are estimates that
    need not sum to step_s.

    router_s: dense compute on a router worker (mean over workers: forward/backward wall outside the dispatcher
    and combine); dispatch_s: dispatcher wall (forward + backward exchanges) minus expert_s (encode, gRPC, decode,
    waiting); expert_s: expert compute of the slowest actor; expert_cpu_s: all actors' compute wall summed;
    expert_compute_cpu_s: their handler threads' CPU in compute; expert_handler_cpu_s / expert_optimizer_cpu_s:
    the actors' request handlers' and optimizer CPU; worker_main_cpu_s / worker_cpu_s: the router workers' CPU in
    forward/backward (main thread / whole process, all workers); combine_s: plan build + gather + combine;
    grad_sync_s: dense grad all-reduce; optimizer_s: norms, replica sums, clip and AdamW on every party with their
    control-plane calls; control_s: phase A's Ray call overhead + worker imbalance.
    """

    step_s: float
    forward_backward_s: float
    control_s: float
    router_s: float
    dispatch_s: float
    expert_s: float
    expert_cpu_s: float
    expert_compute_cpu_s: float
    expert_handler_cpu_s: float
    expert_optimizer_cpu_s: float
    worker_main_cpu_s: float
    worker_cpu_s: float
    combine_s: float
    grad_sync_s: float
    optimizer_s: float
    grad_norm: float
    clip_coef: float

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class TimingMeans:
    """Running sums of StepTimings, for the per-run means a train result reports."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0

    def add(self, t: StepTimings) -> None:
        for k, v in t.as_dict().items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def means(self) -> dict[str, float]:
        n = max(1, self.steps)
        return {k: v / n for k, v in self.sums.items()}
