"""Step simulation: routing trace + placement + cost model -> step time, per-GPU busy time, bytes, timeline.

What is simulated (one training step, or one forward pass when `training=False`), as the runtime runs it:
per router worker and micro-batch, for every layer, the dense part of the layer (norms, LFA attention, router,
plan), then one request per destination actor (rows from ``split_over_replicas`` on the chunk's counts under the
current Placement, exactly the runtime's replica split), each actor serving its requests one at a time in order
of arrival (grouped SwiGLU per expert segment), the replies back to the worker, which goes on when it has all of
them. After the last layer the LM head and loss (forward + backward); then backward mirrors the forward (experts
and dense at ``backward_factor`` x forward). After the last micro-batch: dense gradients all-reduced over the
router workers (ring, alpha-beta), replicas of an expert summing their gradients (ring per replica group), and
the optimizer step on every party (memory-bound AdamW).

Resources and sharing:
- every GPU is one compute server (FIFO): in the co-located layout its router worker and its expert actor queue
  on the same GPU; with a host table every process shares one pool of ``host_cores`` cores instead;
- every GPU has an egress and an ingress port per link class (loopback, NVLink, InfiniBand). A flow ends at
  ``alpha + max(egress done, ingress done)``, each port a FIFO server of the flow's bytes / bandwidth. Flows
  that start together on a port share it fairly and end together (exact for equal sizes; a worker's dispatch
  to all its actors is one such batch). So one flow over one link takes ``alpha + bytes / beta`` and two flows
  on one link take twice as long.

How it is computed (and why it is fast): events are aggregated by counts, never per token. Jobs and flows are
processed in waves, one wave per (micro-batch, layer, phase) in dependency order; inside a wave every queue is
solved at once by the vectorised FIFO recursion in ``queues.py`` (numpy, no per-job Python). A resource serves
the waves in order, so a job of a later wave never overtakes one of an earlier wave on the same GPU or port even
if it became ready first (a worker a whole layer ahead of another on one actor): that is the one approximation
of the wave schedule, and it can only matter under heavy straggling. Host tables use a heap of core free times.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from moe_runtime.config import RuntimeConfig
from moe_runtime.placement import Placement
from moe_runtime.sim.cost_model import LINK_CLASSES, CostModel, HardwareTable, Link, load_table
from moe_runtime.sim.queues import CorePool, fifo_end, tie_groups
from moe_runtime.sim.traces import RoutingTrace, synthetic_trace

__all__ = [
    "Layout",
    "SimError",
    "SimResult",
    "Simulator",
    "Timeline",
    "split_rows",
    "static_placement",
]

_LOOP, _INTRA, _INTER = 0, 1, 2
_NEG = -np.inf
# [actors, workers] matrices are float32: the waves are memory-bound and float32 halves the traffic (4x faster
# here); 2**-24 relative is 0.1 us on a 1 s step. Per-worker times and totals stay float64.
_F = np.float32


class SimError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True, eq=False)
class Layout:
    """Where router workers and expert actors run. Devices are GPUs (or processes, with a host table).

    - ``colocated``: GPU g runs router worker g and expert actor g (like Megatron EP): W = A = GPUs.
    - ``separate``: expert actors on GPUs [0, A), router workers on GPUs [A, A + W) (the runtime's processes
      each on their own GPU).
    Nodes: device // gpus_per_node.
    """

    kind: Literal["colocated", "separate"]
    worker_device: np.ndarray
    actor_device: np.ndarray
    num_devices: int
    gpus_per_node: int

    @classmethod
    def colocated(cls, gpus: int, gpus_per_node: int = 8) -> Layout:
        d = np.arange(gpus)
        return cls("colocated", d, d.copy(), gpus, gpus_per_node)

    @classmethod
    def separate(cls, workers: int, actors: int, gpus_per_node: int = 8) -> Layout:
        return cls("separate", np.arange(actors, actors + workers), np.arange(actors), actors + workers,
                   gpus_per_node)  # fmt: skip

    @property
    def num_workers(self) -> int:
        return len(self.worker_device)

    @property
    def num_actors(self) -> int:
        return len(self.actor_device)

    @property
    def num_nodes(self) -> int:
        return (self.num_devices - 1) // self.gpus_per_node + 1

    def actor_nodes(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.actor_device // self.gpus_per_node)

    def link_class(self) -> np.ndarray:
        """[W, A] link class of worker w <-> actor a: 0 same device, 1 same node, 2 across nodes."""
        wd, ad = self.worker_device[:, None], self.actor_device[None, :]
        same_node = (wd // self.gpus_per_node) == (ad // self.gpus_per_node)
        return np.where(wd == ad, _LOOP, np.where(same_node, _INTRA, _INTER)).astype(np.int8)

    @classmethod
    def from_config(cls, cfg: RuntimeConfig, host: bool) -> Layout:
        """The layout a config describes. With a host table: the local cluster's processes on this machine
        (separate, one node). Otherwise `sim.layout` if the field exists ("auto" = colocated when
        router_workers == expert_actors == sim.gpus, else separate)."""
        c, s = cfg.cluster, cfg.sim
        W, A = c.router_workers, c.expert_actors
        if host:
            return cls.separate(W, A, gpus_per_node=W + A)
        kind = s.layout
        if kind == "auto":
            kind = "colocated" if W == A == s.gpus else "separate"
        if kind == "colocated":
            if not W == A == s.gpus:
                raise SimError(
                    f"sim layout colocated needs cluster.router_workers = cluster.expert_actors = sim.gpus, got "
                    f"{W}, {A}, {s.gpus}"
                )
            return cls.colocated(s.gpus, s.gpus_per_node)
        if kind != "separate":
            raise SimError(f"sim.layout = {kind!r}: expected auto, colocated or separate")
        if W + A > s.gpus:
            raise SimError(f"separate layout: {A} expert actors + {W} router workers need {W + A} GPUs, "
                           f"sim.gpus = {s.gpus}")  # fmt: skip
        return cls.separate(W, A, s.gpus_per_node)


def static_placement(num_layers: int, num_experts: int, num_actors: int, actor_nodes: tuple[int, ...] = ()
                     ) -> Placement:  # fmt: skip
    """The static layout: ``Placement.contiguous`` when actors <= experts; with more actors than experts, expert e
    on actors e, e + E, e + 2E, ... (Megatron's expert-parallel group of E with expert data parallelism), so
    every actor holds exactly one expert per layer."""
    if num_actors <= num_experts:
        return Placement.contiguous(num_layers, num_experts, num_actors, actor_nodes)
    row = tuple(tuple(range(e, num_actors, num_experts)) for e in range(num_experts))
    return Placement(num_actors, (row,) * num_layers, actor_nodes=actor_nodes)


# ----------------------------------------------------------------------------------------------- the split


@dataclass(frozen=True, eq=False)
class _Slots:
    """One layer's replica slots, sorted by actor: slot i = replica `rank[i]` of expert `expert[i]`."""

    expert: np.ndarray
    rank: np.ndarray
    nrep: np.ndarray
    actor: np.ndarray
    starts: np.ndarray  # first slot of each actor present
    actors_present: np.ndarray

    @classmethod
    def of(cls, replicas_row: tuple[tuple[int, ...], ...]) -> _Slots:
        ex, rk, nr, ac = [], [], [], []
        for e, actors in enumerate(replicas_row):
            for i, a in enumerate(actors):
                ex.append(e), rk.append(i), nr.append(len(actors)), ac.append(a)
        ex, rk, nr, ac = map(np.asarray, (ex, rk, nr, ac))
        order = np.lexsort((ex, ac))
        ex, rk, nr, ac = ex[order], rk[order], nr[order], ac[order]
        first = np.ones(len(ac), dtype=bool)
        first[1:] = ac[1:] != ac[:-1]
        return cls(ex, rk, nr, ac, np.flatnonzero(first), ac[first])


def split_rows(counts_we: np.ndarray, slots: _Slots) -> np.ndarray:
    """[W, S] rows per replica slot: ``split_over_replicas`` vectorised over workers (replica i of R gets
    n // R rows, plus one for i < n % R). tests/sim checks it against split_over_replicas itself."""
    c = counts_we[:, slots.expert]
    return c // slots.nrep + (slots.rank < c % slots.nrep)


def _per_actor(x_ws: np.ndarray, slots: _Slots, num_actors: int) -> np.ndarray:
    """Sum slot columns per actor: [W, S] -> [W, A]."""
    out = np.zeros((x_ws.shape[0], num_actors), dtype=np.float64)
    out[:, slots.actors_present] = np.add.reduceat(x_ws, slots.starts, axis=1)
    return out


# ----------------------------------------------------------------------------------------------- results


@dataclass
class Timeline:
    """Busy intervals per device: one per (device, wave): from the first job's start to the last job's end."""

    device: list[np.ndarray] = field(default_factory=list)
    start: list[np.ndarray] = field(default_factory=list)
    end: list[np.ndarray] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)  # one per appended block
    layer: list[int] = field(default_factory=list)

    def add(self, device: np.ndarray, start: np.ndarray, end: np.ndarray, kind: str, layer: int) -> None:
        keep = np.isfinite(start) & (end > start)
        if keep.any():
            self.device.append(np.asarray(device)[keep])
            self.start.append(start[keep])
            self.end.append(end[keep])
            self.kind.append(kind)
            self.layer.append(layer)

    def rows(self) -> list[tuple[int, float, float, str, int]]:
        out = []
        for d, s, e, k, layer in zip(self.device, self.start, self.end, self.kind, self.layer):
            out += [(int(a), float(b), float(c), k, layer) for a, b, c in zip(d, s, e)]
        return out


@dataclass
class SimResult:
    step_time_s: float
    per_layer_s: list[float]  # per layer: forward + backward span (first dense start to last reply), summed
    gpu_busy_fraction: list[float]  # per device: compute busy time / step time
    bytes_moved_per_step: float  # data plane: dispatch + combine, forward + backward, all link classes
    bytes_by_class: dict[str, float]
    grad_sync_bytes_per_step: float
    imbalance: float  # sum_l max_a rows / sum_l mean_a rows (forward; scheduler.load's definition)
    phases: dict[str, float]
    layout: str
    devices: int
    workers: int
    actors: int
    messages_per_step: int
    timeline: Timeline | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("timeline")
        d["gpu_busy_mean"] = float(np.mean(self.gpu_busy_fraction)) if self.gpu_busy_fraction else 0.0
        return d


# ----------------------------------------------------------------------------------------------- engine


@dataclass(frozen=True, eq=False)
class _LayerWork:
    """One (micro-batch, layer): per request (actor, worker) rows, expert time, bytes, port time, latency."""

    time_aw: np.ndarray  # expert compute (forward) of the request
    time_bwd_aw: np.ndarray  # its backward
    bytes_aw: np.ndarray
    mask_aw: np.ndarray  # a request exists (rows > 0)
    svc_aw: np.ndarray  # bytes / bandwidth of the request's link class: time on a port
    lat_aw: np.ndarray  # alpha + rpc overhead + codec: latency after the ports
    svc_wa: np.ndarray  # the same, worker-major (combine ingress)
    lat_max_wc: np.ndarray  # [W, 3] largest latency of a worker's requests per link class
    bytes_wc: np.ndarray  # [W, 3] bytes per worker per link class
    bytes_by_class: np.ndarray  # [3]
    messages: int
    actor_rows: np.ndarray  # [A] forward rows per actor


_SMALL = 32


def _members(is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column indices of the True entries of each row, padded: (idx [rows, m], valid [rows, m])."""
    m = max(1, int(is_member.sum(axis=1).max()))
    order = np.argsort(~is_member, axis=1, kind="stable")[:, :m]
    valid = np.take_along_axis(is_member, order, axis=1)
    return np.where(valid, order, 0), valid


def _small_fifo(r: np.ndarray, w: np.ndarray, member: np.ndarray, idx: np.ndarray, free: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """FIFO per row on compact arrays (r = -inf for non-members): sort by r, solve; jobs ready together end
    together (a fair-shared batch). Returns (end, column index, member), all in the sorted order."""
    r = np.where(member, r, _F(_NEG))
    o = np.argsort(r, axis=1, kind="stable")
    rs = np.take_along_axis(r, o, axis=1)
    ws = np.where(np.take_along_axis(member, o, axis=1), np.take_along_axis(w, o, axis=1), _F(0))
    end = _row_ties(rs, fifo_end(rs, ws, free))
    return end, np.take_along_axis(idx, o, axis=1), np.take_along_axis(member, o, axis=1)


def _row_ties(rs: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Rows of jobs sorted by ready time: jobs ready at the same time form a batch that shares the server and
    ends together (at the end of the batch's last job)."""
    n = end.shape[1]
    if n < 2:
        return end
    same = np.zeros(end.shape, dtype=bool)
    same[:, :-1] = (rs[:, 1:] == rs[:, :-1]) & np.isfinite(rs[:, 1:])
    if not same.any():
        return end
    last = np.minimum.accumulate(np.where(same, n, np.arange(n))[:, ::-1], axis=1)[:, ::-1]
    return np.take_along_axis(end, last, axis=1)


class _StepEngine:
    """State of one simulated step: resource free times, busy time, byte counters, timeline."""

    def __init__(self, cost: CostModel, layout: Layout, record: bool):
        self.cost, self.layout = cost, layout
        D = layout.num_devices
        self.host = cost.host
        self.pool = CorePool(cost.table.host_cores) if self.host else None
        self.comp_free = np.zeros(D)
        self.eg_free = np.zeros((3, D))
        self.in_free = np.zeros((3, D))
        self.busy = np.zeros(D)
        self.bytes_by_class = np.zeros(3)
        self.messages = 0
        self.timeline = Timeline() if record else None
        links = [cost.links[c] for c in LINK_CLASSES]
        self.alpha = np.array([lk.alpha_s for lk in links])
        self.bw = np.array([lk.bandwidth for lk in links])
        self.cpu = np.array([lk.cpu_s for lk in links])
        self.wd, self.ad = layout.worker_device, layout.actor_device
        W, A = layout.num_workers, layout.num_actors
        self.cls_wa = layout.link_class()
        self.cls_aw = np.ascontiguousarray(self.cls_wa.T)
        # Link classes present. A "small" class has at most _SMALL flows per port per wave (loopback, NVLink in a
        # large cluster): its queues are solved on compact [rows, members] arrays; a "big" one on masked
        # [actors, workers] arrays in one global order.
        self.classes = [c for c in range(3) if (self.cls_wa == c).any()]
        per_a = {c: int((self.cls_aw == c).sum(axis=1).max()) for c in self.classes}
        per_w = {c: int((self.cls_wa == c).sum(axis=1).max()) for c in self.classes}
        self.small = [c for c in self.classes if max(per_a[c], per_w[c]) <= _SMALL]
        self.big = [c for c in self.classes if c not in self.small]
        self.small_a = {c: _members(self.cls_aw == c) for c in self.small}
        self.small_w = {c: _members(self.cls_wa == c) for c in self.small}
        self.rows_a = {c: np.broadcast_to(np.arange(A)[:, None], self.small_a[c][0].shape) for c in self.small}
        self.rows_w = {c: np.broadcast_to(np.arange(W)[:, None], self.small_w[c][0].shape) for c in self.small}
        self.rowbase_aw = (np.arange(A) * W)[:, None]
        self.rowbase_wa = (np.arange(W) * A)[:, None]

    # -------------------------------------------------------------- compute

    def compute(self, ready: np.ndarray, work: np.ndarray, dev: np.ndarray, kind: str, layer: int) -> np.ndarray:
        """One job per entry on device dev[i] (distinct devices). Returns end times."""
        if self.host:
            start, end = self.pool.run(ready, work)
        else:
            start = np.maximum(ready, self.comp_free[dev])
            end = start + work
            self.comp_free[dev] = np.where(work > 0, end, self.comp_free[dev])
        self.busy[dev] += work
        if self.timeline is not None:
            self.timeline.add(dev, start, np.where(work > 0, end, start), kind, layer)
        return np.where(work > 0, end, ready)

    # -------------------------------------------------------------- one MoE exchange

    def moe(self, t_w: np.ndarray, lw: _LayerWork, backward: bool, kind: str, layer: int) -> np.ndarray:
        """Dispatch -> experts -> combine for every worker, each starting at t_w; returns when each worker has
        all its replies (t_w for a worker that sent nothing)."""
        self.messages += 2 * lw.messages
        self.bytes_by_class += 2 * lw.bytes_by_class
        work = lw.time_bwd_aw if backward else lw.time_aw
        if self.host:
            got = self._host_moe(t_w, lw, work, kind, layer)
        else:
            arrive = self._dispatch(t_w, lw)
            end_s, flat = self._experts(arrive, work, kind, layer)
            got = self._combine(end_s, flat, lw)
        return np.maximum(t_w, got)

    def _dispatch(self, t_w: np.ndarray, lw: _LayerWork) -> np.ndarray:
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
            end, cols, member = _small_fifo(np.where(member, t32[idx], _F(_NEG)), lw.svc_aw[rows, idx], member, idx,
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

    def _combine(self, end_s: np.ndarray, flat: np.ndarray, lw: _LayerWork) -> np.ndarray:
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
                end = _row_ties(r, fifo_end(r, np.where(member, svc_s, _F(0)), free))
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
            end, cols, member = _small_fifo(d, lw.svc_aw[rows, idx], member, idx, free)
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
            end, _, member = _small_fifo(d, lw.svc_wa[rows, idx], member, idx, self.in_free[c, self.wd].astype(_F))
            got = self._worker_port(c, member, end[:, -1], lw, got)
        return got

    def _worker_port(self, c: int, member: np.ndarray, span: np.ndarray, lw: _LayerWork, got: np.ndarray
                     ) -> np.ndarray:  # fmt: skip
        has = member.any(axis=1)
        self.in_free[c, self.wd] = np.where(has, span, self.in_free[c, self.wd])
        return np.maximum(got, np.where(has, span + lw.lat_max_wc[:, c], _NEG))

    # -------------------------------------------------------------- host tables: a shared pool of cores

    def _host_moe(self, t_w: np.ndarray, lw: _LayerWork, work: np.ndarray, kind: str, layer: int) -> np.ndarray:
        m = lw.mask_aw
        arrive = self._host_flows(np.broadcast_to(t_w[None, :], m.shape), lw)
        start, end = self.pool.run(np.where(m, arrive, 0.0), np.where(m, work, 0.0))
        start, end = start.reshape(m.shape), end.reshape(m.shape)
        self.busy[self.ad] += work.sum(axis=1, dtype=np.float64)
        if self.timeline is not None:
            for a in range(m.shape[0]):
                for s, e in zip(start[a][m[a]], end[a][m[a]]):
                    self.timeline.add(self.ad[a : a + 1], np.array([s]), np.array([e]), kind, layer)
        return self._host_flows(np.where(m, end, _NEG), lw).max(axis=0)

    def _host_flows(self, ready_aw: np.ndarray, lw: _LayerWork) -> np.ndarray:
        """A message costs CPU on the shared cores (rpc + bytes / bandwidth + codec), then alpha."""
        m = lw.mask_aw
        work = self.cpu[_LOOP] + lw.svc_aw + self.cost.codec_time(lw.bytes_aw)
        _, end = self.pool.run(np.where(m, ready_aw, 0.0), np.where(m, work, 0.0))
        return np.where(m, end.reshape(m.shape) + self.alpha[_LOOP], _NEG)


# ----------------------------------------------------------------------------------------------- simulator


class Simulator:
    """Simulates steps of a routing trace on a layout, with a cost model.

        sim = Simulator.from_config(cfg)                     # cost table from cfg.sim.hardware
        result = sim.run_step(trace.step(0), placement)     # SimResult
        results = sim.run(trace, steps=10, placement=p)     # one SimResult per step
    """

    def __init__(self, cost: CostModel, layout: Layout, *, micro_batches: int = 1, training: bool = True):
        self.cost, self.layout = cost, layout
        self.micro_batches = micro_batches
        self.training = training
        self._slots: dict[int, tuple[Placement, tuple[_Slots, ...]]] = {}
        self._cls_wa = layout.link_class()
        self._cls_onehot = np.stack([self._cls_wa == c for c in range(3)], axis=-1)  # [W, A, 3]
        links = [cost.links[c] for c in LINK_CLASSES]
        self._alpha = np.array([lk.alpha_s for lk in links])
        self._bw = np.array([lk.bandwidth for lk in links])

    @classmethod
    def from_config(cls, cfg: RuntimeConfig, table: HardwareTable | str | None = None,
                    training: bool | None = None) -> Simulator:  # fmt: skip
        """Cost model and layout from a config; `table` overrides cfg.sim.hardware."""
        if table is None or isinstance(table, str):
            table = load_table(table or cfg.sim.hardware)
        wire = {"float32": 4, "float16": 2, "bfloat16": 2}[cfg.transport.wire_dtype]
        seq = cfg.train.seq_len
        cost = CostModel.build(table, cfg.model, seq, wire)
        layout = Layout.from_config(cfg, host=cost.host)
        return cls(cost, layout, micro_batches=cfg.train.micro_batches,
                   training=cfg.sim.training if training is None else training)  # fmt: skip

    def default_placement(self) -> Placement:
        m = self.cost.model
        return static_placement(m.num_layers, m.num_experts, self.layout.num_actors, self.layout.actor_nodes())

    def synthetic(self, kind: str, steps: int = 1, tokens_per_worker: int = 4096, zipf_s: float = 1.0,
                  seed: int = 0, **kw: Any) -> RoutingTrace:  # fmt: skip
        """A synthetic trace shaped for this simulator (workers, micro-batches, model)."""
        m = self.cost.model
        return synthetic_trace(kind, steps=steps, workers=self.layout.num_workers, layers=m.num_layers,  # type: ignore[arg-type]
                               experts=m.num_experts, top_k=m.top_k, tokens_per_worker=tokens_per_worker,
                               micro_batches=self.micro_batches, zipf_s=zipf_s, seed=seed, **kw)  # fmt: skip

    # -------------------------------------------------------------- work per layer

    def _layer_slots(self, placement: Placement) -> tuple[_Slots, ...]:
        hit = self._slots.get(id(placement))
        if hit is None or hit[0] is not placement:
            if len(self._slots) > 8:
                self._slots.clear()
            hit = (placement, tuple(_Slots.of(row) for row in placement.replicas))
            self._slots[id(placement)] = hit
        return hit[1]

    def _work(self, counts_we: np.ndarray, slots: _Slots) -> _LayerWork:
        cost, A = self.cost, self.layout.num_actors
        rows = split_rows(counts_we, slots)
        rows_wa = _per_actor(rows, slots, A)
        time_wa = _per_actor(cost.expert_time(rows), slots, A)
        time_bwd_wa = _per_actor(cost.expert_time(rows, backward=True), slots, A)
        bytes_wa = cost.message_bytes(rows_wa)
        mask_wa = rows_wa > 0
        cls = self._cls_wa
        svc_wa = bytes_wa / self._bw[cls]
        lat_wa = np.where(mask_wa, self._alpha[cls] + cost.rpc_overhead_s + cost.codec_time(bytes_wa), _NEG)
        bytes_wc = np.einsum("wa,wac->wc", bytes_wa, self._cls_onehot)
        lat_max_wc = np.stack([np.where(cls == c, lat_wa, _NEG).max(axis=1) for c in range(3)], axis=1)
        return _LayerWork(
            time_aw=np.ascontiguousarray(time_wa.T, dtype=_F), time_bwd_aw=np.ascontiguousarray(time_bwd_wa.T, dtype=_F),
            bytes_aw=np.ascontiguousarray(bytes_wa.T),
            mask_aw=np.ascontiguousarray(mask_wa.T), svc_aw=np.ascontiguousarray(svc_wa.T, dtype=_F),
            lat_aw=np.ascontiguousarray(lat_wa.T, dtype=_F), svc_wa=svc_wa.astype(_F), lat_max_wc=lat_max_wc,
            bytes_wc=bytes_wc,
            bytes_by_class=bytes_wc.sum(axis=0), messages=int(mask_wa.sum()), actor_rows=rows_wa.sum(axis=0),
        )  # fmt: skip

    # -------------------------------------------------------------- one step

    def run_step(self, counts_cle: np.ndarray, placement: Placement | None = None, *,
                 record_timeline: bool = False) -> SimResult:  # fmt: skip
        """One step of chunk counts [chunks, layers, experts] (chunks = workers x micro-batches)."""
        cost, lay = self.cost, self.layout
        W, A, M = lay.num_workers, lay.num_actors, self.micro_batches
        model = cost.model
        L, E, k = model.num_layers, model.num_experts, model.top_k
        placement = placement or self.default_placement()
        counts_cle = np.asarray(counts_cle)
        if counts_cle.shape != (W * M, L, E):
            raise SimError(f"counts have shape {counts_cle.shape}: expected (workers x micro_batches, layers, "
                           f"experts) = ({W * M}, {L}, {E})")  # fmt: skip
        if (placement.num_actors, placement.num_layers, placement.num_experts) != (A, L, E):
            raise SimError(f"placement is {placement.num_actors} actors x {placement.num_layers} layers x "
                           f"{placement.num_experts} experts: expected {A} x {L} x {E}")  # fmt: skip
        slots = self._layer_slots(placement)
        eng = _StepEngine(cost, lay, record_timeline)
        wd = lay.worker_device
        t_w = np.zeros(W)
        layer_span = np.zeros(L)
        actor_rows = np.zeros((L, A))
        for m in range(M):
            chunk = counts_cle[m::M] if M > 1 else counts_cle  # chunk c = w * M + m
            tokens = chunk[:, 0, :].sum(axis=1) / k
            dense = cost.dense_time(tokens)
            dense_bwd = cost.dense_bwd_time(tokens)
            works = [self._work(chunk[:, layer, :], slots[layer]) for layer in range(L)]
            for layer in range(L):
                w = works[layer]
                actor_rows[layer] += w.actor_rows
                t0 = t_w.min()
                t_w = eng.compute(t_w, dense, wd, "dense", layer)
                t_w = eng.moe(t_w, w, False, "experts", layer)
                layer_span[layer] += t_w.max() - t0
            head = cost.head_time(tokens) * ((1 + cost.head_bwd_factor) if self.training else 1.0)
            t_w = eng.compute(t_w, head, wd, "head", L)
            if not self.training:
                continue
            for layer in reversed(range(L)):
                w = works[layer]
                t0 = t_w.min()
                t_w = eng.moe(t_w, w, True, "experts_bwd", layer)
                t_w = eng.compute(t_w, dense_bwd, wd, "dense_bwd", layer)
                layer_span[layer] += t_w.max() - t0
        fb_end = max(float(t_w.max()), float(eng.comp_free.max()) if not eng.host else 0.0)
        sync_s, sync_bytes, opt_s = self._step_boundary(eng, placement, fb_end) if self.training else (0.0, 0.0, 0.0)
        overhead = cost.table.step_overhead_s
        step = fb_end + sync_s + opt_s + overhead
        means = actor_rows.mean(axis=1).sum()
        imb = float(actor_rows.max(axis=1).sum() / means) if means > 0 else 1.0
        return SimResult(
            step_time_s=float(step),
            per_layer_s=[float(x) for x in layer_span],
            gpu_busy_fraction=[float(x) for x in np.minimum(eng.busy / step, 1.0)] if step > 0 else [],
            bytes_moved_per_step=float(eng.bytes_by_class.sum()),
            bytes_by_class={c: float(b) for c, b in zip(LINK_CLASSES, eng.bytes_by_class)},
            grad_sync_bytes_per_step=float(sync_bytes),
            imbalance=imb,
            phases={"forward_backward_s": fb_end, "grad_sync_s": sync_s, "optimizer_s": opt_s,
                    "step_overhead_s": overhead, "cpu_work_s": eng.pool.busy if eng.host else 0.0,
                    # host tables: the compute part of it, per role (the rest: messages and the optimizer)
                    "expert_work_s": float(eng.busy[lay.actor_device].sum()) if eng.host else 0.0,
                    "dense_work_s": float(eng.busy[lay.worker_device].sum()) if eng.host else 0.0},
            layout=lay.kind if not cost.host else "host",
            devices=lay.num_devices,
            workers=W,
            actors=A,
            messages_per_step=eng.messages,
            timeline=eng.timeline,
        )

    def _step_boundary(self, eng: _StepEngine, placement: Placement, t0: float) -> tuple[float, float, float]:
        """Gradient sync (dense ring over workers; ring per replicated expert) and the optimizer step.
        Returns (sync seconds, sync bytes, optimizer seconds) after the last backward (a collective barrier)."""
        cost, lay = self.cost, self.layout
        W, D = lay.num_workers, lay.num_devices
        gb = cost.table.grad_bytes_per_param
        dense_bytes = cost.dense_params_per_worker * gb
        expert_bytes = cost.expert_params * gb
        sync_dev = np.zeros(D)
        total_bytes = 0.0
        if W > 1:
            nodes = np.unique(lay.worker_device // lay.gpus_per_node)
            c = _INTER if len(nodes) > 1 else (_INTRA if not eng.host else _LOOP)
            link = cost.links[LINK_CLASSES[c]]
            if cost.allreduce_bandwidth > 0:  # measured collective (host tables)
                link = Link(cost.allreduce_alpha_s, cost.allreduce_bandwidth)
            t = 2 * (W - 1) * (link.alpha_s + link.cpu_s) + 2 * (W - 1) / W * dense_bytes / link.bandwidth
            sync_dev[lay.worker_device] += t
            total_bytes += 2 * (W - 1) * dense_bytes
        shards = np.zeros(lay.num_actors)
        for row in placement.replicas:
            for actors in row:
                R = len(actors)
                shards[list(actors)] += 1
                if R == 1:
                    continue
                nodes = {lay.actor_device[a] // lay.gpus_per_node for a in actors}
                c = _INTER if len(nodes) > 1 else (_INTRA if not eng.host else _LOOP)
                link = cost.links[LINK_CLASSES[c]]
                t = 2 * (R - 1) * (link.alpha_s + link.cpu_s) + 2 * (R - 1) / R * expert_bytes / link.bandwidth
                sync_dev[lay.actor_device[list(actors)]] += t
                total_bytes += 2 * (R - 1) * expert_bytes
        opt_dev = np.zeros(D)
        opt_dev[lay.worker_device] += cost.optimizer_time(cost.dense_params_per_worker)
        opt_dev[lay.actor_device] += shards * cost.optimizer_time(cost.expert_params)
        if eng.host:  # CPU work: every party's share runs on the shared cores
            _, end = eng.pool.run(np.full(D, max(t0, eng.pool.free_at)), sync_dev)
            sync_s = float(end.max() - t0) if D else 0.0
            _, end2 = eng.pool.run(np.full(D, t0 + sync_s), opt_dev)
            opt_s = float(end2.max() - t0 - sync_s)
        else:
            sync_s = float(sync_dev.max())
            opt_end = sync_dev + opt_dev
            opt_s = float(opt_end.max() - sync_s)
            eng.busy += opt_dev
        return sync_s, total_bytes, opt_s

    # -------------------------------------------------------------- many steps

    def run(self, trace: RoutingTrace, steps: int | None = None, placement: Placement | None = None,
            *, record_timeline: bool = False) -> list[SimResult]:  # fmt: skip
        """Steps 0..steps-1 of the trace (wrapping around), each from idle."""
        self.check_trace(trace)
        steps = trace.num_steps if steps is None else steps
        return [self.run_step(trace.step(s), placement, record_timeline=record_timeline) for s in range(steps)]

    def check_trace(self, trace: RoutingTrace) -> None:
        m, lay = self.cost.model, self.layout
        want = (lay.num_workers * self.micro_batches, m.num_layers, m.num_experts)
        if trace.counts.shape[1:] != want or trace.micro_batches != self.micro_batches:
            raise SimError(
                f"trace is {trace.num_chunks} chunks ({trace.micro_batches} micro-batches) x {trace.num_layers} "
                f"layers x {trace.num_experts} experts: this simulation needs {want[0]} chunks "
                f"({lay.num_workers} workers x {self.micro_batches} micro-batches) x {want[1]} x {want[2]}"
            )
        if trace.top_k != m.top_k:
            raise SimError(f"trace top_k = {trace.top_k}: model top_k = {m.top_k}")


def summarize(results: list[SimResult]) -> dict[str, Any]:
    """Mean over steps of the scalar metrics; per-layer and per-GPU lists averaged elementwise."""
    if not results:
        raise SimError("no results to summarize")
    n = len(results)
    first = results[0].to_dict()
    out: dict[str, Any] = dict(first)
    for key in ("step_time_s", "bytes_moved_per_step", "grad_sync_bytes_per_step", "imbalance"):
        out[key] = float(np.mean([getattr(r, key) for r in results]))
    out["per_layer_s"] = np.mean([r.per_layer_s for r in results], axis=0).tolist()
    out["gpu_busy_fraction"] = np.mean([r.gpu_busy_fraction for r in results], axis=0).tolist()
    out["gpu_busy_mean"] = float(np.mean(out["gpu_busy_fraction"]))
    out["phases"] = {k: float(np.mean([r.phases[k] for r in results])) for k in first["phases"]}
    out["bytes_by_class"] = {k: float(np.mean([r.bytes_by_class[k] for r in results])) for k in LINK_CLASSES}
    out["step_time_s_per_step"] = [r.step_time_s for r in results]
    out["steps"] = n
    return out
