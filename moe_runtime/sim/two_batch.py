"""Two-batch overlap in the simulator (``transport.overlap: two_batch``; the runtime's model/two_batch.py).

The runtime splits every micro-batch in two halves by rows (sequences) and, per MoE layer, keeps one half's
expert exchange in flight while the other half runs attention and the router, in forward and backward. Here the
same schedule is placed job by job on the step's resources (``StepResources``), so what overlaps is what the
machine lets overlap; nothing is a discount factor:

- per layer and router worker, in this order on the resources: dense(h0), h0's dispatch, dense(h1) and h0's
  experts (on a GPU that runs both, an expert actor beside the worker, whichever is ready first goes first: a
  GPU runs kernels as they come), h1's dispatch, h0's replies, h1's experts, h1's replies. A half's next dense
  job waits for its own replies and for the worker's thread (one thread per worker: its jobs never run side by
  side; on the host the frames are encoded on it, ``send``'s second answer). Co-located, this is the order of
  SGLang's / DeepSeek's two-batch overlap: A attention, B attention while A's dispatch travels, A experts, B
  experts while A's combine travels, A attention of the next layer ...;
- after the last layer: both halves' LM head and loss forward, then (one loss over both) their head backward;
  backward mirrors the forward: a half's backward exchange of layer l is sent after its dense backward of
  layer l + 1 (or its head backward), the other half's dense backward running while it travels;
- what splitting costs comes from the cost model, asked for half-sized work: every call twice per actor per
  layer (per-call and per-message overheads twice; on a GPU two smaller matmuls, each reading the expert's
  weights again: ``max(FLOPs / rate, weight bytes / HBM)`` per call), dense layers and the head twice at half
  the tokens (fixed terms twice).

Halves: the runtime's split (``model.two_batch.split_rows``: ceil(rows / 2) and the rest), rows = tokens per
chunk // seq_len. A micro-batch of fewer than 2 rows cannot be split and runs whole, as in the runtime. The
trace holds each chunk's counts over both halves (what the runtime records), so each expert's count is divided
in proportion to the halves' rows (``split_counts``, deterministic rounding), which is exact in expectation; the
real halves differ by their routing noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moe_runtime.sim.cost_model import CostModel, StepResources
from moe_runtime.sim.work import LayerWork, ReplicaSlots

__all__ = ["Halves", "ScheduleTotals", "halves_of", "run_two_batch", "split_counts"]

_GOLDEN = 0.6180339887498949  # stratified rounding offsets: consecutive (layer, expert) cells spread over [0, 1)


@dataclass(frozen=True)
class Halves:
    """A step's chunks split in two halves each, as one trace of 2M micro-batches: chunk w * 2M + 2m + h is half
    h of worker w's micro-batch m (the runtime's wire micro-batch 2m + h, ``model.two_batch.half_context``)."""

    counts_cle: np.ndarray  # [W * 2M, L, E]
    tokens_c: np.ndarray  # [W * 2M] tokens per half
    micro_batches: int  # 2M


def split_counts(counts_cle: np.ndarray, frac0_c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each chunk's copies per (layer, expert) divided between its halves in proportion frac0 : 1 - frac0, every
    cell rounded down or up by a fixed offset in [0, 1) (so a layer's total is kept to within rounding and no
    expert always gets the odd copy on the same side). Returns (half 0, half 1), both [C, L, E]."""
    counts_cle = np.asarray(counts_cle, dtype=np.int64)
    _, L, E = counts_cle.shape
    offset_le = ((np.arange(L * E) + 0.5) * _GOLDEN % 1.0).reshape(L, E)
    h0 = np.floor(counts_cle * np.asarray(frac0_c, dtype=np.float64)[:, None, None] + offset_le).astype(np.int64)
    h0 = np.clip(h0, 0, counts_cle)
    return h0, counts_cle - h0


def halves_of(counts_cle: np.ndarray, tokens_c: np.ndarray, micro_batches: int, seq_len: int) -> Halves | None:
    """The runtime's halves of every chunk (rows = tokens // seq_len, ceil(rows / 2) in the first half); None when
    some chunk has fewer than 2 rows (the runtime runs such a micro-batch whole)."""
    tokens_c = np.asarray(tokens_c, dtype=np.float64)
    rows_c = np.floor(tokens_c / seq_len + 1e-9)
    if len(rows_c) == 0 or rows_c.min() < 2:
        return None
    frac0_c = np.ceil(rows_c / 2) / rows_c
    h0, h1 = split_counts(counts_cle, frac0_c)
    C, L, E = h0.shape
    counts = np.stack([h0, h1], axis=1).reshape(C * 2, L, E)  # chunk w*M + m -> halves 2(w*M + m) + h
    tokens = np.stack([tokens_c * frac0_c, tokens_c * (1 - frac0_c)], axis=1).reshape(C * 2)
    return Halves(counts, tokens, 2 * micro_batches)


@dataclass
class ScheduleTotals:
    """What the engine sums over a step's schedule (the same as for the plain schedule)."""

    t_w: np.ndarray  # [W] when each worker's last job of the step ended
    layer_span: np.ndarray  # [L]
    actor_rows: np.ndarray  # [L, A] forward rows per actor
    bytes_by_class: np.ndarray  # [3]
    messages: int


def run_two_batch(cost: CostModel, res: StepResources, halves: Halves, slots: tuple[ReplicaSlots, ...],
                  work_of: Callable[[np.ndarray, ReplicaSlots], LayerWork], worker_device: np.ndarray,
                  actor_device: np.ndarray, training: bool) -> ScheduleTotals:  # fmt: skip
    """Place every micro-batch's two pipelined halves on `res` (module docstring); micro-batches one after the
    other, each forward then backward, as the runtime runs them."""
    model = cost.model
    L = model.num_layers
    W = len(worker_device)
    num_devices = int(max(worker_device.max(), actor_device.max())) + 1
    M2 = halves.micro_batches
    wd = worker_device
    tot = ScheduleTotals(np.zeros(W), np.zeros(L), np.zeros((L, len(actor_device))), np.zeros(3), 0)

    def sent_and_served(ready: list[np.ndarray], jobs: list[np.ndarray], kind: str, job_layer: int,
                        works: list[LayerWork], backward: bool, layer: int, thread: np.ndarray
                        ) -> tuple[list[np.ndarray], np.ndarray, float]:  # fmt: skip
        """Each half's compute job (`kind` of layer `job_layer`) on the worker, after its inputs and the worker's
        thread, then its exchange of `layer`, in the order of the module docstring. Returns (when each half has
        its replies, the worker's thread, the earliest send)."""
        work_of_half = [w.time_bwd_aw if backward else w.time_aw for w in works]
        ekind = "experts_bwd" if backward else "experts"
        for w in works:
            tot.messages += 2 * w.messages  # requests and replies
            tot.bytes_by_class += 2 * w.bytes_by_class
        end0 = res.compute(np.maximum(ready[0], thread), jobs[0], wd, kind, job_layer)
        arrive0, thread = res.send(end0, works[0])
        thread = np.maximum(thread, end0)
        # Half 1's job and half 0's experts share a GPU where an actor runs beside the worker: the one ready first
        # goes first (a GPU runs kernels as they come), decided per device
        ready1 = np.maximum(ready[1], thread)
        first_in_d = np.full(num_devices, np.inf)
        np.minimum.at(first_in_d, actor_device, np.where(np.isfinite(arrive0), arrive0, np.inf).min(axis=1))
        before = ready1 <= first_in_d[wd]
        end1 = res.compute(ready1, np.where(before, jobs[1], 0.0), wd, kind, job_layer)
        served0 = res.serve(arrive0, work_of_half[0], ekind, layer)
        end1 = np.where(before, end1, res.compute(ready1, np.where(before, 0.0, jobs[1]), wd, kind, job_layer))
        arrive1, thread = res.send(end1, works[1])
        thread = np.maximum(thread, end1)
        got = [np.maximum(end0, res.reply(served0, works[0]))]  # half 0's replies after half 1's dispatch
        got.append(np.maximum(end1, res.reply(res.serve(arrive1, work_of_half[1], ekind, layer), works[1])))
        sent_at = [end0, end1]
        return got, thread, float(min(sent_at[0].min(), sent_at[1].min()))

    for m in range(M2 // 2):
        idx = [np.arange(W) * M2 + 2 * m + h for h in (0, 1)]  # chunks of the two halves of micro-batch m
        tokens = [halves.tokens_c[i] for i in idx]
        dense = [cost.dense_time(t) for t in tokens]
        dense_bwd = [cost.dense_bwd_time(t) for t in tokens]
        works = [[work_of(halves.counts_cle[i, layer, :], slots[layer]) for layer in range(L)] for i in idx]
        thread = tot.t_w.copy()
        ready = [thread.copy(), thread.copy()]
        for layer in range(L):
            t0 = min(float(np.maximum(r, thread).min()) for r in ready)
            tot.actor_rows[layer] += works[0][layer].actor_rows + works[1][layer].actor_rows
            ready, thread, _ = sent_and_served(ready, dense, "dense", layer, [works[0][layer], works[1][layer]],
                                               False, layer, thread)  # fmt: skip
            tot.layer_span[layer] += max(r.max() for r in ready) - t0
        for h in (0, 1):  # LM head + loss forward of each half
            thread = res.compute(np.maximum(ready[h], thread), cost.head_time(tokens[h]), wd, "head", L)
        if not training:
            tot.t_w = thread
            continue
        # one loss over both halves: backward starts after both forwards; first job of each half: its head
        ready = [thread.copy(), thread.copy()]
        jobs = [cost.head_time(t) * cost.head_bwd_factor for t in tokens]
        kind = "head"  # then the dense backward of the layer above
        for layer in reversed(range(L)):
            ready, thread, t0 = sent_and_served(ready, jobs, kind, layer + 1, [works[0][layer], works[1][layer]],
                                                True, layer, thread)  # fmt: skip
            tot.layer_span[layer] += max(r.max() for r in ready) - t0
            jobs, kind = dense_bwd, "dense_bwd"
        for h in (0, 1):  # the first layer's dense backward
            thread = res.compute(np.maximum(ready[h], thread), dense_bwd[h], wd, "dense_bwd", 0)
        tot.t_w = thread
    return tot
