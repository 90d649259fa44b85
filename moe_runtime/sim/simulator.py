"""Step simulation: routing trace + placement + cost model -> step time, per-device busy time, bytes, timeline.

What is simulated (one training step, or one forward pass when `training=False`), as the runtime runs it:
per router worker and micro-batch, for every layer, the dense part of the layer (norms, LFA attention, router,
plan), then one request per destination actor (rows from the replica split on the chunk's counts under the
current Placement, exactly the runtime's split), each actor serving its requests one at a time in order of
arrival (grouped SwiGLU per expert segment), the replies back to the worker, which goes on when it has all of
them. After the last layer the LM head and loss (forward + backward); then backward mirrors the forward. After
the last micro-batch: dense gradients all-reduced over the router workers (ring, alpha-beta), replicas of an
expert summing their gradients (ring per replica group), and the optimizer step on every party.

With ``overlap="two_batch"`` (transport.overlap; the runtime's model/two_batch.py) every micro-batch of at least 2
rows runs as two halves whose exchanges overlap the other half's compute, placed job by job on the same
resources (two_batch.py): what splitting costs (twice the calls, half-size work) comes from the cost model, what
overlapping gains from the schedule; ``overlap="none"`` is the plain schedule above, unchanged.

One engine for every table: what each call costs and how the step's jobs share the machine (FIFO GPUs and link
ports, or one pool of shared cores) are the cost model's answers (``cost_model.CostModel``,
``StepResources``). Events are aggregated by counts, never per token, and processed in waves, one per
(micro-batch, layer, phase) in dependency order; inside a wave every queue is solved at once (numpy, no per-job
Python), which keeps a 256-GPU, 24-layer step under a second.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moe_runtime.config import ModelConfig, RuntimeConfig
from moe_runtime.placement import Placement
from moe_runtime.sim.cost_model import CostModel, StepResources
from moe_runtime.sim.gpu_cost import GpuCostModel
from moe_runtime.sim.hardware import LINK_CLASSES, HardwareTable, load_table
from moe_runtime.sim.host_cost import HostCostModel
from moe_runtime.sim.layout import Layout, SimError, static_placement
from moe_runtime.sim.results import SimResult
from moe_runtime.sim.traces import RoutingTrace, synthetic_trace
from moe_runtime.sim.two_batch import Halves, halves_of, run_two_batch
from moe_runtime.sim.work import WORK_DTYPE, LayerWork, ReplicaSlots, per_actor, split_rows

__all__ = ["OVERLAP_MODES", "Simulator", "build_cost_model"]

_F = WORK_DTYPE
_NEG = -np.inf
WIRE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
COST_MODELS: dict[str, type[GpuCostModel] | type[HostCostModel]] = {"gpu": GpuCostModel, "host": HostCostModel}
OVERLAP_MODES = ("none", "two_batch")  # config.TransportConfig.overlap


def build_cost_model(table: HardwareTable, model: ModelConfig, seq_len: int, wire_bytes: int = 2) -> CostModel:
    """The cost model of the table's kind, for one model."""
    return COST_MODELS[table.kind].build(table, model, seq_len, wire_bytes)


class Simulator:
    """Simulates steps of a routing trace on a layout, with a cost model.

        sim = Simulator.from_config(cfg)                     # cost table from cfg.sim.hardware
        result = sim.run_step(trace.step(0), placement)     # SimResult
        results = sim.run(trace, steps=10, placement=p)     # one SimResult per step
    """

    def __init__(self, cost: CostModel, layout: Layout, *, micro_batches: int = 1, training: bool = True,
                 overlap: str = "none"):  # fmt: skip
        if overlap not in OVERLAP_MODES:
            raise SimError(f"overlap = {overlap!r}: expected one of {', '.join(OVERLAP_MODES)}")
        self.cost, self.layout = cost, layout
        self.micro_batches = micro_batches
        self.training = training
        self.overlap = overlap  # transport.overlap: "two_batch" pipelines two halves per micro-batch (two_batch.py)
        self._slots: dict[int, tuple[Placement, tuple[ReplicaSlots, ...]]] = {}
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
        cost = build_cost_model(table, cfg.model, cfg.train.seq_len, WIRE_BYTES[cfg.transport.wire_dtype])
        return cls(cost, cost.layout_of(cfg), micro_batches=cfg.train.micro_batches,
                   training=cfg.sim.training if training is None else training,
                   overlap=cfg.transport.overlap)  # fmt: skip

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

    def _layer_slots(self, placement: Placement) -> tuple[ReplicaSlots, ...]:
        hit = self._slots.get(id(placement))
        if hit is None or hit[0] is not placement:
            if len(self._slots) > 8:
                self._slots.clear()
            hit = (placement, tuple(ReplicaSlots.of(row) for row in placement.replicas))
            self._slots[id(placement)] = hit
        return hit[1]

    def _work(self, counts_we: np.ndarray, slots: ReplicaSlots) -> LayerWork:
        cost, A = self.cost, self.layout.num_actors
        rows = split_rows(counts_we, slots)
        rows_wa = per_actor(rows, slots, A)
        time_wa = per_actor(cost.expert_time(rows), slots, A)
        time_bwd_wa = per_actor(cost.expert_time(rows, backward=True), slots, A)
        bytes_wa = cost.message_bytes(rows_wa)
        mask_wa = rows_wa > 0
        cls = self._cls_wa
        svc_wa = bytes_wa / self._bw[cls]
        lat_wa = np.where(mask_wa, self._alpha[cls] + cost.rpc_overhead_s + cost.codec_time(bytes_wa), _NEG)
        bytes_wc = np.einsum("wa,wac->wc", bytes_wa, self._cls_onehot)
        lat_max_wc = np.stack([np.where(cls == c, lat_wa, _NEG).max(axis=1) for c in range(3)], axis=1)
        return LayerWork(
            time_aw=np.ascontiguousarray(time_wa.T, dtype=_F), time_bwd_aw=np.ascontiguousarray(time_bwd_wa.T, dtype=_F),
            bytes_aw=np.ascontiguousarray(bytes_wa.T),
            mask_aw=np.ascontiguousarray(mask_wa.T), svc_aw=np.ascontiguousarray(svc_wa.T, dtype=_F),
            lat_aw=np.ascontiguousarray(lat_wa.T, dtype=_F), svc_wa=svc_wa.astype(_F), lat_max_wc=lat_max_wc,
            bytes_wc=bytes_wc,
            bytes_by_class=bytes_wc.sum(axis=0), messages=int(mask_wa.sum()), actor_rows=rows_wa.sum(axis=0),
        )  # fmt: skip

    # -------------------------------------------------------------- one step

    def run_step(self, counts_cle: np.ndarray, placement: Placement | None = None, *,
                 record_timeline: bool = False, tokens_c: np.ndarray | None = None) -> SimResult:  # fmt: skip
        """One step of chunk counts [chunks, layers, experts] (chunks = workers x micro-batches). `tokens_c`:
        tokens per chunk when copies per token vary (top-p routing); default copies / top_k."""
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
        res = cost.resources(lay, record_timeline)
        wd = lay.worker_device
        t_w = np.zeros(W)
        layer_span = np.zeros(L)
        actor_rows = np.zeros((L, A))
        bytes_by_class = np.zeros(3)
        messages = 0

        def exchange(t_w: np.ndarray, lw: LayerWork, backward: bool, kind: str, layer: int) -> np.ndarray:
            nonlocal bytes_by_class, messages
            messages += 2 * lw.messages  # requests and replies
            bytes_by_class += 2 * lw.bytes_by_class
            got = res.exchange(t_w, lw, lw.time_bwd_aw if backward else lw.time_aw, kind, layer)
            return np.maximum(t_w, got)

        halves = self.halves(counts_cle, tokens_c)
        if halves is not None:  # two-batch overlap: the two halves of every micro-batch pipelined (two_batch.py)
            tot = run_two_batch(cost, res, halves, slots, self._work, wd, lay.actor_device, self.training)
            t_w, layer_span, actor_rows, bytes_by_class, messages = (tot.t_w, tot.layer_span, tot.actor_rows,
                                                                     tot.bytes_by_class, tot.messages)  # fmt: skip
        else:
            for m in range(M):
                chunk = counts_cle[m::M] if M > 1 else counts_cle  # chunk c = w * M + m
                tokens = chunk[:, 0, :].sum(axis=1) / k if tokens_c is None else np.asarray(tokens_c, float)[m::M]
                dense = cost.dense_time(tokens)
                dense_bwd = cost.dense_bwd_time(tokens)
                works = [self._work(chunk[:, layer, :], slots[layer]) for layer in range(L)]
                for layer in range(L):
                    w = works[layer]
                    actor_rows[layer] += w.actor_rows
                    t0 = t_w.min()
                    t_w = res.compute(t_w, dense, wd, "dense", layer)
                    t_w = exchange(t_w, w, False, "experts", layer)
                    layer_span[layer] += t_w.max() - t0
                head = cost.head_time(tokens) * ((1 + cost.head_bwd_factor) if self.training else 1.0)
                t_w = res.compute(t_w, head, wd, "head", L)
                if not self.training:
                    continue
                for layer in reversed(range(L)):
                    w = works[layer]
                    t0 = t_w.min()
                    t_w = exchange(t_w, w, True, "experts_bwd", layer)
                    t_w = res.compute(t_w, dense_bwd, wd, "dense_bwd", layer)
                    layer_span[layer] += t_w.max() - t0
        fb_end = max(float(t_w.max()), res.busy_until())
        sync_s, sync_bytes, opt_s = self._step_boundary(res, placement, fb_end) if self.training else (0.0, 0.0, 0.0)
        overhead = cost.table.step_overhead_s
        step = fb_end + sync_s + opt_s + overhead
        means = actor_rows.mean(axis=1).sum()
        imb = float(actor_rows.max(axis=1).sum() / means) if means > 0 else 1.0
        return SimResult(
            step_time_s=float(step),
            per_layer_s=[float(x) for x in layer_span],
            gpu_busy_fraction=[float(x) for x in np.minimum(res.busy / step, 1.0)] if step > 0 else [],
            bytes_moved_per_step=float(bytes_by_class.sum()),
            bytes_by_class={c: float(b) for c, b in zip(LINK_CLASSES, bytes_by_class)},
            grad_sync_bytes_per_step=float(sync_bytes),
            imbalance=imb,
            phases={"forward_backward_s": fb_end, "grad_sync_s": sync_s, "optimizer_s": opt_s,
                    "step_overhead_s": overhead, **res.cpu_work()},
            layout=cost.layout_name(lay),
            devices=lay.num_devices,
            workers=W,
            actors=A,
            messages_per_step=messages,
            timeline=res.timeline,
            overlap="none" if halves is None else "two_batch",
        )

    def halves(self, counts_cle: np.ndarray, tokens_c: np.ndarray | None = None) -> Halves | None:
        """The two halves of every micro-batch this simulator pipelines (overlap two_batch), or None: overlap none,
        or a micro-batch of fewer than 2 rows (the runtime runs it whole)."""
        if self.overlap != "two_batch":
            return None
        counts_cle = np.asarray(counts_cle)
        k = self.cost.model.top_k
        tok = counts_cle[:, 0, :].sum(axis=1) / k if tokens_c is None else np.asarray(tokens_c, float)
        return halves_of(counts_cle, tok, self.micro_batches, self.cost.seq_len)

    def _step_boundary(self, res: StepResources, placement: Placement, t0: float) -> tuple[float, float, float]:
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
            link = cost.dense_sync_link(lay.spans_nodes(lay.worker_device))
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
                devices = lay.actor_device[list(actors)]
                link = cost.replica_sync_link(lay.spans_nodes(devices))
                t = 2 * (R - 1) * (link.alpha_s + link.cpu_s) + 2 * (R - 1) / R * expert_bytes / link.bandwidth
                sync_dev[devices] += t
                total_bytes += 2 * (R - 1) * expert_bytes
        opt_dev = np.zeros(D)
        opt_dev[lay.worker_device] += cost.optimizer_time(cost.dense_params_per_worker)
        opt_dev[lay.actor_device] += shards * cost.optimizer_time(cost.expert_params)
        sync_s, opt_s = res.step_boundary(t0, sync_dev, opt_dev)
        return sync_s, total_bytes, opt_s

    # -------------------------------------------------------------- many steps

    def run(self, trace: RoutingTrace, steps: int | None = None, placement: Placement | None = None,
            *, record_timeline: bool = False) -> list[SimResult]:  # fmt: skip
        """Steps 0..steps-1 of the trace (wrapping around), each from idle."""
        self.check_trace(trace)
        steps = trace.num_steps if steps is None else steps
        tok = trace.token_counts
        return [self.run_step(trace.step(s), placement, record_timeline=record_timeline,
                              tokens_c=None if tok is None else tok[s % trace.num_steps]) for s in range(steps)]

    def check_trace(self, trace: RoutingTrace) -> None:
        m, lay = self.cost.model, self.layout
        want = (lay.num_workers * self.micro_batches, m.num_layers, m.num_experts)
        if trace.counts.shape[1:] != want or trace.micro_batches != self.micro_batches:
            raise SimError(
                f"trace is {trace.num_chunks} chunks ({trace.micro_batches} micro-batches) x {trace.num_layers} "
                f"layers x {trace.num_experts} experts: this simulation needs {want[0]} chunks "
                f"({lay.num_workers} workers x {self.micro_batches} micro-batches) x {want[1]} x {want[2]}"
            )
        if trace.top_k not in (m.top_k, m.max_copies_per_token):  # top_p: k_max (recorded) or top_k (synthetic)
            raise SimError(f"trace top_k = {trace.top_k}: model top_k = {m.top_k}"
                           + (f" (k_max {m.max_copies_per_token})" if m.routing == "top_p" else ""))
