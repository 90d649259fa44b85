"""The one interface between the simulator's engine and the hardware: what each call costs, and how one step's
jobs share the machine.

The engine (simulator.py) asks a ``CostModel``:
- compute per call: ``expert_time(rows, backward)`` (one expert segment), ``dense_time`` / ``dense_bwd_time``
  (one layer's norms, attention/LFA, router), ``head_time`` (embedding, final norm, LM head, loss; backward
  ``head_bwd_factor`` x), ``optimizer_time(params)``;
- messages: ``message_bytes(rows)``, ``codec_time(bytes)``, ``rpc_overhead_s``, ``links`` (alpha-beta per class);
- gradient sync: ``dense_sync_link`` (router workers' ring) and ``replica_sync_link`` (an expert's replicas);
- where things run: ``layout_of(cfg)``, ``layout_name(layout)``;
- per step, ``resources(layout, record)``: the ``StepResources`` that serve its jobs (FIFO GPUs and link ports,
  or one pool of shared cores) and say when each job ends.

Two implementations: ``GpuCostModel`` (gpu_cost.py: datasheet roofline, GPU-direct data plane) and
``HostCostModel`` (host_cost.py: this machine, measured); ``simulator.build_cost_model`` picks one by the table's
kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from moe_runtime.config import ModelConfig, RuntimeConfig
from moe_runtime.model.accounting import count_params, expert_param_count, flops_per_token
from moe_runtime.sim.hardware import HardwareTable, Link
from moe_runtime.sim.layout import Layout
from moe_runtime.sim.results import Timeline
from moe_runtime.sim.work import LayerWork

__all__ = [
    "FRAME_HEADER_BYTES",
    "CostModel",
    "StepResources",
    "dense_flops_per_token",
    "expert_flops_per_row",
    "head_flops_per_token",
]

FRAME_HEADER_BYTES = 256  # codec prefix + msgpack header of a dispatch frame (a few experts), rounded up


def expert_flops_per_row(model: ModelConfig) -> float:
    """Forward FLOPs of one token row through one SwiGLU expert (2 per multiply-add)."""
    return 2.0 * expert_param_count(model)


def dense_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one layer's dense part: its weights plus its share of causal attention scores."""
    fl = flops_per_token(model, seq_len)
    return 2.0 * count_params(model).dense_params_per_layer + fl["attention_score_flops_per_token_causal"] / (
        model.num_layers
    )


def head_flops_per_token(model: ModelConfig) -> float:
    """Forward FLOPs per token of the tied LM head."""
    return 2.0 * model.vocab_size * model.hidden_size


class StepResources(Protocol):
    """The machine during one step, idle at t = 0: it serves the step's jobs and says when each ends."""

    busy: np.ndarray  # [devices] compute seconds placed on each device
    timeline: Timeline | None

    def compute(self, ready: np.ndarray, work: np.ndarray, dev: np.ndarray, kind: str, layer: int) -> np.ndarray:
        """One job per entry on device dev[i] (distinct devices), ready at ready[i]: end times (ready where the
        job has no work)."""
        ...

    def exchange(self, t_w: np.ndarray, lw: LayerWork, work_aw: np.ndarray, kind: str, layer: int) -> np.ndarray:
        """Dispatch -> experts (work_aw per request) -> combine for every worker, each starting at t_w[w]: when
        each worker has all its replies (-inf for a worker that sent nothing)."""
        ...

    def send(self, t_w: np.ndarray, lw: LayerWork) -> tuple[np.ndarray, np.ndarray]:
        """The dispatch of an exchange alone (two-batch overlap): (arrival at the actors [A, W], -inf for no
        request; when each worker may go on [W])."""
        ...

    def serve(self, arrive_aw: np.ndarray, work_aw: np.ndarray, kind: str, layer: int) -> Any:
        """The experts of a dispatch `send` placed (work_aw per request): what `reply` needs."""
        ...

    def reply(self, served: Any, lw: LayerWork) -> np.ndarray:
        """The combine of requests `serve` placed: as `exchange` returns (``exchange`` = send, serve, reply)."""
        ...

    def busy_until(self) -> float:
        """When the last job placed so far ends (0 when none)."""
        ...

    def step_boundary(self, t0: float, sync_dev: np.ndarray, opt_dev: np.ndarray) -> tuple[float, float]:
        """After the barrier at t0: gradient sync (sync_dev seconds per device), then the optimizer (opt_dev):
        (sync seconds, optimizer seconds)."""
        ...

    def cpu_work(self) -> dict[str, float]:
        """CPU seconds placed on shared cores: ``cpu_work_s`` (all of it), ``expert_work_s`` and
        ``dense_work_s`` (the compute part per role); zeros where nothing runs on shared cores."""
        ...


@dataclass(frozen=True)
class CostModel(ABC):
    """Per-call costs for one model on one table. All times in seconds, forward unless named otherwise."""

    table: HardwareTable
    model: ModelConfig
    seq_len: int
    wire_bytes: int  # bytes per activation value on the wire
    dense_params_per_worker: int  # everything a router worker holds: layers' dense parts + embedding + norm
    expert_params: int  # one expert
    # the linear terms both kinds have: fixed + per row / token
    expert_fixed_s: float
    expert_s_per_row: float
    expert_bwd_fixed_s: float
    expert_bwd_s_per_row: float
    dense_fixed_s: float
    dense_s_per_token: float
    dense_bwd_factor: float
    head_fixed_s: float
    head_s_per_token: float
    head_bwd_factor: float
    optimizer_s_per_param: float
    codec_fixed_s: float
    codec_s_per_byte: float
    rpc_overhead_s: float  # latency per message beyond the link's alpha

    @staticmethod
    def model_fields(table: HardwareTable, model: ModelConfig, seq_len: int, wire_bytes: int) -> dict[str, Any]:
        """The fields that depend on the model only (shared by every kind's ``build``)."""
        counts = count_params(model)
        return {
            "table": table, "model": model, "seq_len": seq_len, "wire_bytes": wire_bytes,
            "dense_params_per_worker": model.num_layers * counts.dense_params_per_layer
            + counts.breakdown["embedding"] + model.hidden_size,
            "expert_params": expert_param_count(model),
        }  # fmt: skip

    @property
    def links(self) -> dict[str, Link]:
        return self.table.links

    # ------------------------------------------------------------------ what differs per kind

    @abstractmethod
    def expert_time(self, rows: np.ndarray, backward: bool = False) -> np.ndarray:
        """Time of one expert segment on `rows` token rows, forward or backward (elementwise; 0 rows -> 0 s)."""

    @abstractmethod
    def dense_time(self, tokens: np.ndarray | float) -> np.ndarray:
        """Forward time of one layer's dense part (norms, attention/LFA, router) on `tokens` tokens."""

    @abstractmethod
    def dense_bwd_time(self, tokens: np.ndarray | float) -> np.ndarray:
        """Backward time of one layer's dense part on `tokens` tokens."""

    @abstractmethod
    def dense_sync_link(self, cross_node: bool) -> Link:
        """The link of the router workers' dense gradient all-reduce (a ring)."""

    @abstractmethod
    def replica_sync_link(self, cross_node: bool) -> Link:
        """The link of the ring that sums one expert's gradients over its replicas."""

    @abstractmethod
    def layout_of(self, cfg: RuntimeConfig) -> Layout:
        """Where the config's router workers and expert actors run under this table."""

    @abstractmethod
    def layout_name(self, layout: Layout) -> str:
        """The layout as results name it."""

    @abstractmethod
    def resources(self, layout: Layout, record: bool) -> StepResources:
        """The machine for one step, idle; `record`: keep a busy timeline."""

    # ------------------------------------------------------------------ the same for every kind

    def head_time(self, tokens: np.ndarray | float) -> np.ndarray:
        """Forward time of embedding + final norm + LM head + loss on `tokens` tokens."""
        tokens = np.asarray(tokens, dtype=np.float64)
        return np.where(tokens > 0, self.head_fixed_s + tokens * self.head_s_per_token, 0.0)

    def message_bytes(self, rows: np.ndarray) -> np.ndarray:
        """Bytes of one dispatch (or result / grad) frame carrying `rows` token rows (0 rows -> no message)."""
        rows = np.asarray(rows, dtype=np.float64)
        return np.where(rows > 0, rows * (self.model.hidden_size * self.wire_bytes) + FRAME_HEADER_BYTES, 0.0)

    def codec_time(self, nbytes: np.ndarray) -> np.ndarray:
        """Encode + decode of one frame of `nbytes` bytes."""
        nbytes = np.asarray(nbytes, dtype=np.float64)
        return np.where(nbytes > 0, 2 * self.codec_fixed_s + nbytes * self.codec_s_per_byte, 0.0)

    def optimizer_time(self, params: float) -> float:
        return params * self.optimizer_s_per_param
