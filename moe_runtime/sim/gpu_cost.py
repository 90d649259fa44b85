"""A GPU cluster from a datasheet table (``kind: gpu``): roofline costs per call, and per step FIFO GPUs and
link ports.

Costs: every kernel takes ``max(FLOPs / (peak * mfu), bytes / HBM)`` plus a launch overhead. The data plane is
GPU-direct (NVLink inside a node, GPUDirect RDMA across nodes, like NCCL / DeepEP), so codec and per-RPC costs
are small latencies, not CPU work.

Resources (``GpuResources``): every GPU is one compute server (FIFO): in the co-located layout its router worker
and its expert actor queue on the same GPU. Every GPU has an egress and an ingress port per link class
(loopback, NVLink, InfiniBand). A flow ends at ``alpha + max(egress done, ingress done)``, each port a FIFO
server of the flow's bytes / bandwidth. Flows that start together on a port share it fairly and end together
(exact for equal sizes; a worker's dispatch to all its actors is one such batch). So one flow over one link
takes ``alpha + bytes / beta`` and two flows on one link take twice as long.

Inside a wave (one micro-batch, layer and phase) every queue is solved at once by the vectorised FIFO recursion
of ``queues.py``. A resource serves the waves in order, so a job of a later wave never overtakes one of an
earlier wave on the same GPU or port even if it became ready first (a worker a whole layer ahead of another on
one actor): the one approximation of the wave schedule, which can only matter under heavy straggling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_runtime.config import ModelConfig, RuntimeConfig
from moe_runtime.sim.cost_model import CostModel, dense_flops_per_token, expert_flops_per_row, head_flops_per_token
from moe_runtime.sim.hardware import LINK_CLASSES, HardwareTable, Link
from moe_runtime.sim.layout import Layout
from moe_runtime.sim.queues import fifo_end, members, row_ties, small_fifo, tie_groups
from moe_runtime.sim.results import Timeline
from moe_runtime.sim.work import WORK_DTYPE, LayerWork

__all__ = ["GpuCostModel", "GpuResources"]

_F = WORK_DTYPE
_NEG = -np.inf
# A link class with at most this many flows per port per wave (loopback; NVLink in a large cluster) is solved on
# compact [rows, members] arrays; a larger one on masked [actors, workers] arrays in one global order.
_SMALL = 32


@dataclass(frozen=True)
class GpuCostModel(CostModel):
    expert_floor_s: float  # time to read one expert's weights from HBM
    expert_bwd_factor: float  # backward / forward: the weights are read this many times backward

    @classmethod
    def build(cls, table: HardwareTable, model: ModelConfig, seq_len: int, wire_bytes: int = 2) -> GpuCostModel:
        rate_e = table.peak_flops * table.mfu_expert
        rate_d = table.peak_flops * table.mfu_dense
        expert_flops_row = expert_flops_per_row(model)
        fields = cls.model_fields(table, model, seq_len, wire_bytes)
        return cls(
            **fields,
            expert_fixed_s=table.kernel_overhead_s,
            expert_s_per_row=expert_flops_row / rate_e,
            expert_floor_s=fields["expert_params"] * table.param_bytes / table.hbm_bandwidth,
            expert_bwd_factor=table.backward_factor,
            expert_bwd_fixed_s=table.backward_factor * table.kernel_overhead_s,
            expert_bwd_s_per_row=table.backward_factor * expert_flops_row / rate_e,
            dense_fixed_s=table.layer_overhead_s,
            dense_s_per_token=dense_flops_per_token(model, seq_len) / rate_d,
            dense_bwd_factor=table.backward_factor,
            head_fixed_s=table.layer_overhead_s,
            head_s_per_token=head_flops_per_token(model) / rate_d,
            head_bwd_factor=table.backward_factor,
            optimizer_s_per_param=table.optimizer_bytes_per_param / table.hbm_bandwidth,
            codec_fixed_s=table.codec_fixed_s,
            codec_s_per_byte=table.codec_s_per_byte,
            rpc_overhead_s=table.rpc_overhead_s,
        )  # fmt: skip

    def expert_time(self, rows: np.ndarray, backward: bool = False) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float64)
        if backward:
            t = self.expert_bwd_fixed_s + np.maximum(rows * self.expert_bwd_s_per_row,
                                                     self.expert_bwd_factor * self.expert_floor_s)  # fmt: skip
        else:
            t = self.expert_fixed_s + np.maximum(rows * self.expert_s_per_row, self.expert_floor_s)
        return np.where(rows > 0, t, 0.0)

    def dense_time(self, tokens: np.ndarray | float) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.float64)
        return np.where(tokens > 0, self.dense_fixed_s + tokens * self.dense_s_per_token, 0.0)

    def dense_bwd_time(self, tokens: np.ndarray | float) -> np.ndarray:
        return self.dense_time(tokens) * self.dense_bwd_factor

    def dense_sync_link(self, cross_node: bool) -> Link:
        return self.links["inter_node" if cross_node else "intra_node"]

    def replica_sync_link(self, cross_node: bool) -> Link:
        return self.links["inter_node" if cross_node else "intra_node"]

    def layout_of(self, cfg: RuntimeConfig) -> Layout:
        return Layout.from_config(cfg)

    def layout_name(self, layout: Layout) -> str:
        return layout.kind

    def resources(self, layout: Layout, record: bool) -> GpuResources:
        return GpuResources(self, layout, record)


class GpuResources:
    """One step on GPUs: a FIFO compute server per GPU and an egress and ingress port per GPU and link class."""

    def __init__(self, cost: GpuCostModel, layout: Layout, record: bool):
        D = layout.num_devices
        self.comp_free = np.zeros(D)
        self.eg_free = np.zeros((3, D))
        self.in_free = np.zeros((3, D))
        self.busy = np.zeros(D)
        self.timeline = Timeline() if record else None
        self.bw = np.array([cost.links[c].bandwidth for c in LINK_CLASSES])
        self.wd, self.ad = layout.worker_device, layout.actor_device
        W, A = layout.num_workers, layout.num_actors
        self.cls_wa = layout.link_class()
        self.cls_aw = np.ascontiguousarray(self.cls_wa.T)
        self.classes = [c for c in range(3) if (self.cls_wa == c).any()]  # link classes present
        per_a = {c: int((self.cls_aw == c).sum(axis=1).max()) for c in self.classes}
        per_w = {c: int((self.cls_wa == c).sum(axis=1).max()) for c in self.classes}
        self.small = [c for c in self.classes if max(per_a[c], per_w[c]) <= _SMALL]
        self.big = [c for c in self.classes if c not in self.small]
        self.small_a = {c: members(self.cls_aw == c) for c in self.small}
        self.small_w = {c: members(self.cls_wa == c) for c in self.small}
        self.rows_a = {c: np.broadcast_to(np.arange(A)[:, None], self.small_a[c][0].shape) for c in self.small}
        self.rows_w = {c: np.broadcast_to(np.arange(W)[:, None], self.small_w[c][0].shape) for c in self.small}
        self.rowbase_aw = (np.arange(A) * W)[:, None]
        self.rowbase_wa = (np.arange(W) * A)[:, None]

    # -------------------------------------------------------------- the StepResources questions

    def compute(self, ready: np.ndarray, work: np.ndarray, dev: np.ndarray, kind: str, layer: int) -> np.ndarray:
        start = np.maximum(ready, self.comp_free[dev])
        end = start + work
        self.comp_free[dev] = np.where(work > 0, end, self.comp_free[dev])
        self.busy[dev] += work
        if self.timeline is not None:
            self.timeline.add(dev, start, np.where(work > 0, end, start), kind, layer)
        return np.where(work > 0, end, ready)

    def exchange(self, t_w: np.ndarray, lw: LayerWork, work_aw: np.ndarray, kind: str, layer: int) -> np.ndarray:
        arrive = self._dispatch(t_w, lw)
        end_s, flat = self._experts(arrive, work_aw, kind, layer)
        return self._combine(end_s, flat, lw)

    def send(self, t_w: np.ndarray, lw: LayerWork) -> tuple[np.ndarray, np.ndarray]:
        """The dispatch alone (two-batch overlap): (arrival [A, W], when each worker may go on [W]). GPU-direct:
        the send is asynchronous, the worker goes on at once."""
        return self._dispatch(t_w, lw), t_w

    def serve(self, arrive_aw: np.ndarray, work_aw: np.ndarray, kind: str, layer: int
              ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """The experts of a dispatch `send` placed: (end times in service order, their flat indices), for `reply`."""
        return self._experts(arrive_aw, work_aw, kind, layer)

    def reply(self, served: tuple[np.ndarray, np.ndarray], lw: LayerWork) -> np.ndarray:
        """The combine of requests `serve` placed: when each worker has all its replies."""
        return self._combine(*served, lw)

    def busy_until(self) -> float:
        return float(self.comp_free.max())

    def step_boundary(self, t0: float, sync_dev: np.ndarray, opt_dev: np.ndarray) -> tuple[float, float]:
        """Each GPU syncs, then steps its optimizer; the step waits for the slowest."""
        sync_s = float(sync_dev.max())
        opt_end = sync_dev + opt_dev
        opt_s = float(opt_end.max() - sync_s)
        self.busy += opt_dev
        return sync_s, opt_s

    def cpu_work(self) -> dict[str, float]:
        return {"cpu_work_s": 0.0, "expert_work_s": 0.0, "dense_work_s": 0.0}

    # -------------------------------------------------------------- one MoE exchange

    def _dispatch(self, t_w: np.ndarray, lw: LayerWork) -> np.ndarray:
        """Flows worker -> actor, all of worker w's starting at t_w[w]. Returns arrival [A, W] (-inf = none)."""
        A, W = lw.mask_aw.shape
        # Egress: each worker's flows of one class are one batch on its port.
        eg_end = np.full((3, W), _NEG)
        for c in self.classes:
            b = lw.bytes_wc[:, c]
            has = b > 0
            ports = self.eg_free[c, self.wd]
            end = np.maximum(t_w, ports) + b / self.bw[c]
            eg_end[c] = np.where(has, end, _NEG)
            self.eg_free[c, self.wd] = np.where(has, end, ports)
        eg32 = eg_end.astype(_F)
        arrive = np.full((A, W), _NEG, dtype=_F)
        # Ingress, big classes: per actor port, batches in order of the workers' start times (one global order).
        if self.big:
            order = np.argsort(t_w, kind="stable")
            ts = t_w[order].astype(_F)
            groups = tie_groups(ts)
            m_s = lw.mask_aw[:, order]
            svc_s = lw.svc_aw[:, order]
            cls_s = self.cls_aw[:, order]
            arrive_s = np.full((A, W), _NEG, dtype=_F)
            for c in self.big:
                member = m_s & (cls_s == c)
                free = self.in_free[c, self.ad].astype(_F)
                end = fifo_end(np.where(member, ts[None, :], _F(_NEG)), np.where(member, svc_s, _F(0)), free)
                if groups is not None:
                    end = end[:, groups]
                end = np.where(member, np.maximum(end, eg32[c, order][None, :]), _F(_NEG))
                self.in_free[c, self.ad] = np.maximum(free, end.max(axis=1))
                arrive_s = np.maximum(arrive_s, end)
            arrive[:, order] = arrive_s
        # Ingress, small classes: the few member flows of each port, sorted by start time.
        t32 = t_w.astype(_F)
        for c in self.small:
            idx, valid = self.small_a[c]
            rows = self.rows_a[c]
            member = valid & lw.mask_aw[rows, idx]
            free = self.in_free[c, self.ad].astype(_F)
            end, cols, member = small_fifo(np.where(member, t32[idx], _F(_NEG)), lw.svc_aw[rows, idx], member, idx,
                                           free)  # fmt: skip
            end = np.maximum(end, eg32[c][cols])
            self.in_free[c, self.ad] = np.maximum(free, np.where(member, end, _F(_NEG)).max(axis=1))
            arrive[rows[member], cols[member]] = end[member]
        arrive += lw.lat_aw
        return arrive

    def _experts(self, arrive_aw: np.ndarray, work_aw: np.ndarray, kind: str, layer: int
                 ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Requests served FIFO by arrival at each actor's GPU. Returns (end times in service order [A, W],
        -inf for no request; flat indices of that order into [A, W] arrays)."""
        A, W = arrive_aw.shape
        flat = (np.argsort(arrive_aw, axis=1) + self.rowbase_aw).ravel()
        r = arrive_aw.ravel()[flat].reshape(A, W)
        w = work_aw.ravel()[flat].reshape(A, W)
        end_s = fifo_end(r, w, self.comp_free[self.ad].astype(_F))
        self.comp_free[self.ad] = end_s[:, -1]
        self.busy[self.ad] += work_aw.sum(axis=1, dtype=np.float64)
        real = np.isfinite(r)
        if self.timeline is not None:
            busy = real & (w > 0)
            first = np.where(busy, end_s - w, np.inf).min(axis=1)
            self.timeline.add(self.ad, first, np.where(busy, end_s, _NEG).max(axis=1), kind, layer)
        return np.where(real, end_s, _F(_NEG)), flat

    def _combine(self, end_s: np.ndarray, flat: np.ndarray, lw: LayerWork) -> np.ndarray:
        """Replies actor -> worker, each leaving when its request is done (end_s, in service order). Returns, per
        worker, when it has all its replies ([W]; -inf when it sent nothing)."""
        A, W = end_s.shape
        done = np.empty(A * W, dtype=_F)
        done[flat] = end_s.ravel()
        done = done.reshape(A, W)
        # Egress at the actor: replies leave in service order.
        arr = np.full((A, W), _NEG, dtype=_F)
        if self.big:
            svc_s = lw.svc_aw.ravel()[flat].reshape(A, W)
            cls_s = self.cls_aw.ravel()[flat].reshape(A, W)
            real = np.isfinite(end_s)
            arr_s = np.full((A, W), _NEG, dtype=_F)
            for c in self.big:
                member = real & (cls_s == c)
                free = self.eg_free[c, self.ad].astype(_F)
                r = np.where(member, end_s, _F(_NEG))
                end = row_ties(r, fifo_end(r, np.where(member, svc_s, _F(0)), free))
                end = np.where(member, end, _F(_NEG))
                self.eg_free[c, self.ad] = np.maximum(free, end.max(axis=1))
                arr_s = np.maximum(arr_s, end)
            arr.ravel()[flat] = arr_s.ravel()
        for c in self.small:
            idx, valid = self.small_a[c]
            rows = self.rows_a[c]
            d = done[rows, idx]
            member = valid & np.isfinite(d)
            free = self.eg_free[c, self.ad].astype(_F)
            end, cols, member = small_fifo(d, lw.svc_aw[rows, idx], member, idx, free)
            self.eg_free[c, self.ad] = np.maximum(free, np.where(member, end, _F(_NEG)).max(axis=1))
            arr[rows[member], cols[member]] = end[member]
        got = (arr + lw.lat_aw).max(axis=0).astype(np.float64)
        # Ingress at the worker: what matters is when its last reply is in (the worker waits for all).
        r_wa = np.ascontiguousarray(done.T)
        if self.big:
            flat_w = (np.argsort(r_wa, axis=1) + self.rowbase_wa).ravel()
            rs = r_wa.ravel()[flat_w].reshape(W, A)
            svc = lw.svc_wa.ravel()[flat_w].reshape(W, A)
            cls = self.cls_wa.ravel()[flat_w].reshape(W, A)
            real = np.isfinite(rs)
            for c in self.big:
                member = real & (cls == c)
                got = self._worker_port(c, member, fifo_end(np.where(member, rs, _F(_NEG)),
                                                            np.where(member, svc, _F(0)),
                                                            self.in_free[c, self.wd].astype(_F))[:, -1], lw, got)
        for c in self.small:
            idx, valid = self.small_w[c]
            rows = self.rows_w[c]
            d = r_wa[rows, idx]
            member = valid & np.isfinite(d)
            end, _, member = small_fifo(d, lw.svc_wa[rows, idx], member, idx, self.in_free[c, self.wd].astype(_F))
            got = self._worker_port(c, member, end[:, -1], lw, got)
        return got

    def _worker_port(self, c: int, member: np.ndarray, span: np.ndarray, lw: LayerWork, got: np.ndarray
                     ) -> np.ndarray:  # fmt: skip
        has = member.any(axis=1)
        self.in_free[c, self.wd] = np.where(has, span, self.in_free[c, self.wd])
        return np.maximum(got, np.where(has, span + lw.lat_max_wc[:, c], _NEG))
