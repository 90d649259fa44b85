"""This machine from a calibrated table (``kind: host``, written by ``calibrate.py``): measured costs per call, and
per step one pool of cores that every process of the local cluster shares.

Costs: compute keeps the measured points and interpolates between them (a table measured on another model size
falls back to its fitted lines, scaled by FLOPs); ``cpu_scale`` (measured against the real cluster) multiplies
every cost. A message costs CPU on the shared cores (the link's ``cpu_s`` + bytes / bandwidth + codec), then
waits the link's ``alpha_s`` without a core.

Resources (``HostResources``): compute, messages, gradient sync and the optimizer are all work on one
``CorePool`` of ``host_cores`` cores, placed in order of ready time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from moe_runtime.config import ModelConfig, RuntimeConfig
from moe_runtime.sim.cost_model import CostModel, dense_flops_per_token, expert_flops_per_row, head_flops_per_token
from moe_runtime.sim.hardware import HardwareTable, Link, number, scale_host_table
from moe_runtime.sim.layout import Layout
from moe_runtime.sim.queues import CorePool
from moe_runtime.sim.results import Timeline
from moe_runtime.sim.work import LayerWork

__all__ = ["HostCostModel", "HostResources"]

_NEG = -np.inf
Curve = tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]  # (x, forward s, backward s)


def _interp(x: np.ndarray, curve: Curve, backward: bool, slope: float) -> np.ndarray:
    """Piecewise-linear through the measured points; below the first point proportional to x, beyond the last
    point its time + slope per unit."""
    xs, ys = np.asarray(curve[0]), np.asarray(curve[2] if backward else curve[1])
    inside = np.interp(x, xs, ys)
    below = ys[0] * x / xs[0]
    beyond = ys[-1] + (x - xs[-1]) * slope
    return np.where(x < xs[0], below, np.where(x > xs[-1], beyond, inside))


def _curve(part: dict, x_key: str, scale: float) -> Curve | None:
    """The measured points of one part, or None for another model size (then: the fitted lines, scaled)."""
    xs, fw, bw = part.get(x_key), part.get("times_s"), part.get("bwd_times_s")
    if scale != 1.0 or not (xs and fw and bw) or not (len(xs) == len(fw) == len(bw)):
        return None
    return tuple(map(float, xs)), tuple(map(float, fw)), tuple(map(float, bw))


@dataclass(frozen=True)
class HostCostModel(CostModel):
    allreduce_alpha_s: float = 0.0  # measured gloo all-reduce (0 bandwidth = use the link classes)
    allreduce_bandwidth: float = 0.0
    # The measured points, interpolated piecewise linearly (beyond the last point: its time + the fitted slope):
    # a line through all of them misses the small-row times (docs/measurements.md).
    expert_curve: Curve | None = None
    dense_curve: Curve | None = None

    @classmethod
    def build(cls, table: HardwareTable, model: ModelConfig, seq_len: int, wire_bytes: int = 2) -> HostCostModel:
        if table.cpu_scale != 1.0:  # measured against the real cluster: every cost x it
            table = replace(scale_host_table(table, table.cpu_scale), cpu_scale=1.0)
        m = table.measured
        ex, de, he = m["expert"], m["dense"], m["head"]
        expert_flops_row = expert_flops_per_row(model)
        dense_flops_tok = dense_flops_per_token(model, seq_len)
        head_flops_tok = head_flops_per_token(model)
        # A table measured on another model size scales its per-row / per-token terms by FLOPs.
        ref = m.get("model", {})
        e_scale = expert_flops_row / (2.0 * 3 * ref["hidden_size"] * ref["ffn_hidden_size"]) if ref else 1.0
        d_scale = dense_flops_tok / ref["dense_flops_per_token"] if ref.get("dense_flops_per_token") else 1.0
        h_scale = head_flops_tok / ref["head_flops_per_token"] if ref.get("head_flops_per_token") else 1.0
        w = "measured"
        return cls(
            **cls.model_fields(table, model, seq_len, wire_bytes),
            expert_fixed_s=number(ex, "fixed_s", f"{w}.expert"),
            expert_s_per_row=number(ex, "s_per_row", f"{w}.expert") * e_scale,
            expert_bwd_fixed_s=number(ex, "bwd_fixed_s", f"{w}.expert", 2.0 * number(ex, "fixed_s", f"{w}.expert")),
            expert_bwd_s_per_row=number(ex, "bwd_s_per_row", f"{w}.expert",
                                        2.0 * number(ex, "s_per_row", f"{w}.expert")) * e_scale,
            dense_fixed_s=number(de, "fixed_s", f"{w}.dense"),
            dense_s_per_token=number(de, "s_per_token", f"{w}.dense") * d_scale,
            dense_bwd_factor=number(de, "backward_factor", f"{w}.dense", 2.0),
            head_fixed_s=number(he, "fixed_s", f"{w}.head"),
            head_s_per_token=number(he, "s_per_token", f"{w}.head") * h_scale,
            head_bwd_factor=number(he, "backward_factor", f"{w}.head", 2.0),
            optimizer_s_per_param=number(m["optimizer"], "s_per_param", f"{w}.optimizer"),
            codec_fixed_s=number(m["codec"], "fixed_s", f"{w}.codec"),
            codec_s_per_byte=number(m["codec"], "s_per_byte", f"{w}.codec"),
            rpc_overhead_s=0.0,  # an RPC's CPU is the link's cpu_s, work on the shared cores
            allreduce_alpha_s=float(m.get("allreduce", {}).get("alpha_s", 0.0)),
            allreduce_bandwidth=float(m.get("allreduce", {}).get("bandwidth", 0.0)),
            expert_curve=_curve(ex, "rows", e_scale),
            dense_curve=_curve(de, "tokens", d_scale),
        )  # fmt: skip

    def expert_time(self, rows: np.ndarray, backward: bool = False) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float64)
        slope = self.expert_bwd_s_per_row if backward else self.expert_s_per_row
        if self.expert_curve is not None:
            return np.where(rows > 0, _interp(rows, self.expert_curve, backward, slope), 0.0)
        fixed = self.expert_bwd_fixed_s if backward else self.expert_fixed_s
        return np.where(rows > 0, fixed + rows * slope, 0.0)

    def dense_time(self, tokens: np.ndarray | float) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.float64)
        if self.dense_curve is not None:
            return np.where(tokens > 0, _interp(tokens, self.dense_curve, False, self.dense_s_per_token), 0.0)
        return np.where(tokens > 0, self.dense_fixed_s + tokens * self.dense_s_per_token, 0.0)

    def dense_bwd_time(self, tokens: np.ndarray | float) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.float64)
        if self.dense_curve is not None:
            slope = self.dense_s_per_token * self.dense_bwd_factor
            return np.where(tokens > 0, _interp(tokens, self.dense_curve, True, slope), 0.0)
        return self.dense_time(tokens) * self.dense_bwd_factor

    def dense_sync_link(self, cross_node: bool) -> Link:
        if self.allreduce_bandwidth > 0:  # the router workers' gloo all-reduce, measured
            return Link(self.allreduce_alpha_s, self.allreduce_bandwidth)
        return self.replica_sync_link(cross_node)

    def replica_sync_link(self, cross_node: bool) -> Link:
        return self.links["inter_node" if cross_node else "loopback"]

    def layout_of(self, cfg: RuntimeConfig) -> Layout:
        return Layout.local_cluster(cfg)

    def layout_name(self, layout: Layout) -> str:
        return "host"

    def resources(self, layout: Layout, record: bool) -> HostResources:
        return HostResources(self, layout, record)


class HostResources:
    """One step on this host: every job of every process is work on one pool of shared cores."""

    def __init__(self, cost: HostCostModel, layout: Layout, record: bool):
        self.cost = cost
        self.pool = CorePool(cost.table.host_cores)
        self.busy = np.zeros(layout.num_devices)
        self.timeline = Timeline() if record else None
        self.wd, self.ad = layout.worker_device, layout.actor_device
        loop = cost.links["loopback"]
        # numpy scalars on purpose: float64 arithmetic with the float32 work matrices
        self.msg_cpu_s, self.msg_alpha_s = np.float64(loop.cpu_s), np.float64(loop.alpha_s)

    def compute(self, ready: np.ndarray, work: np.ndarray, dev: np.ndarray, kind: str, layer: int) -> np.ndarray:
        start, end = self.pool.run(ready, work)
        self.busy[dev] += work
        if self.timeline is not None:
            self.timeline.add(dev, start, np.where(work > 0, end, start), kind, layer)
        return np.where(work > 0, end, ready)

    def exchange(self, t_w: np.ndarray, lw: LayerWork, work_aw: np.ndarray, kind: str, layer: int) -> np.ndarray:
        arrive, _ = self.send(t_w, lw)
        return self.reply(self.serve(arrive, work_aw, kind, layer), lw)

    def send(self, t_w: np.ndarray, lw: LayerWork) -> tuple[np.ndarray, np.ndarray]:
        """The dispatch alone (two-batch overlap): (arrival [A, W], when each worker may go on [W]: the frames
        are encoded on the worker's own thread, so it goes on when its messages' CPU is done)."""
        arrive = self._flows(np.broadcast_to(t_w[None, :], lw.mask_aw.shape), lw)
        return arrive, np.maximum(t_w, (arrive - self.msg_alpha_s).max(axis=0))

    def serve(self, arrive: np.ndarray, work_aw: np.ndarray, kind: str, layer: int) -> np.ndarray:
        """The experts of a dispatch `send` placed: when each request is done ([A, W], -inf for none)."""
        m = np.isfinite(arrive)
        start, end = self.pool.run(np.where(m, arrive, 0.0), np.where(m, work_aw, 0.0))
        start, end = start.reshape(m.shape), end.reshape(m.shape)
        self.busy[self.ad] += work_aw.sum(axis=1, dtype=np.float64)
        if self.timeline is not None:
            for a in range(m.shape[0]):
                for s, e in zip(start[a][m[a]], end[a][m[a]]):
                    self.timeline.add(self.ad[a : a + 1], np.array([s]), np.array([e]), kind, layer)
        return np.where(m, end, _NEG)

    def reply(self, done_aw: np.ndarray, lw: LayerWork) -> np.ndarray:
        """The combine of requests `serve` placed: when each worker has all its replies."""
        return self._flows(done_aw, lw).max(axis=0)

    def busy_until(self) -> float:
        return self.pool.free_at

    def step_boundary(self, t0: float, sync_dev: np.ndarray, opt_dev: np.ndarray) -> tuple[float, float]:
        """Every party's sync, then its optimizer step, as work on the shared cores."""
        D = len(sync_dev)
        _, end = self.pool.run(np.full(D, max(t0, self.pool.free_at)), sync_dev)
        sync_s = float(end.max() - t0) if D else 0.0
        _, end2 = self.pool.run(np.full(D, t0 + sync_s), opt_dev)
        opt_s = float(end2.max() - t0 - sync_s)
        return sync_s, opt_s

    def cpu_work(self) -> dict[str, float]:
        return {"cpu_work_s": self.pool.busy, "expert_work_s": float(self.busy[self.ad].sum()),
                "dense_work_s": float(self.busy[self.wd].sum())}  # fmt: skip

    def _flows(self, ready_aw: np.ndarray, lw: LayerWork) -> np.ndarray:
        """A message costs CPU on the shared cores (rpc + bytes / bandwidth + codec), then alpha."""
        m = lw.mask_aw
        work = self.msg_cpu_s + lw.svc_aw + self.cost.codec_time(lw.bytes_aw)
        _, end = self.pool.run(np.where(m, ready_aw, 0.0), np.where(m, work, 0.0))
        return np.where(m, end.reshape(m.shape) + self.msg_alpha_s, _NEG)
