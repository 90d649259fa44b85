"""In-process timings for a host cost table: experts, dense layers, head, optimizer, codec; and how much of this
shared machine a process gets now.

Every figure is the median of several runs, timed in this thread's (or process's) CPU seconds: on a shared
machine those do not grow with other tenants' load, wall time does. Compute is measured as the runtime runs it,
on a working set as large as a run's (cold weights, evicted caches: in the cluster other processes run between
two calls of one process), with ``cluster.torch_threads`` intra-op threads set by the caller.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe_runtime.config import ModelConfig, TrainConfig
from moe_runtime.dispatch.codec import decode_frame, encode_frame
from moe_runtime.model.accounting import expert_param_count
from moe_runtime.model.experts import grouped_swiglu_backward, grouped_swiglu_forward_saving
from moe_runtime.model.norm import RMSNorm
from moe_runtime.model.transformer import DecoderLayer
from moe_runtime.placement import Placement
from moe_runtime.training import make_adamw

__all__ = [
    "distinct_experts",
    "fit_line",
    "machine_state",
    "measure_codec",
    "measure_dense",
    "measure_experts",
    "measure_head",
    "measure_optimizer",
    "median_time",
]


def median_time(fn: Callable[[], Any], repeats: int, inner: int = 1, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> float:  # fmt: skip
    """Median seconds per call on `clock`: wall time by default; ``time.process_time`` for this process's CPU
    seconds (on a shared machine the CPU time of single-threaded work does not grow with other tenants' load;
    wall time does); ``time.thread_time`` where other threads of this process may run meanwhile."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(inner):
            fn()
        times.append((clock() - t0) / inner)
    return statistics.median(times)


def fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x with a, b >= 0."""
    b, a = np.polyfit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), 1)
    if b < 0:
        return float(np.mean(y)), 0.0
    if a < 0:
        return 0.0, float(np.dot(x, y) / np.dot(x, x))
    return float(a), float(b)


def _probe_work() -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, 256, generator=g), torch.randn(256, 512, generator=g)

    def work() -> None:  # ~50 ms: long enough to span several scheduler slices
        for _ in range(48):
            (a @ b).relu_().sum()

    return work


def machine_state(repeats: int = 7) -> dict[str, float]:
    """How much of this shared machine a process gets now: ``stretch`` = wall / CPU seconds of a fixed
    single-threaded workload (median of `repeats`; 1.0 on an idle machine, more when other tenants compete for
    the cores). ``hardware.scale_host_table(table, stretch)`` turns a calibrated table (CPU seconds) into wall
    seconds."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        work = _probe_work()
        work()
        ratios = []
        for _ in range(repeats):
            w0, c0 = time.perf_counter(), time.thread_time()
            work()
            ratios.append((time.perf_counter() - w0) / max(time.thread_time() - c0, 1e-9))
        return {"stretch": statistics.median(ratios)}
    finally:
        torch.set_num_threads(prev)


# ----------------------------------------------------------------------------------------------- compute


def distinct_experts(model: ModelConfig, cap_bytes: int = 256 << 20) -> int:
    """How many distinct experts the calibration cycles through: all of the model's (layers x experts), at most
    `cap_bytes` of fp32 weights. A run touches every expert's weights once per exchange with the other processes
    running in between, so they come from memory, not cache; one expert timed over and over stays in cache and
    costs less CPU (docs/measurements.md)."""
    per_expert = expert_param_count(model) * 4
    return int(max(1, min(model.num_layers * model.num_experts, cap_bytes // per_expert)))


class _CacheEvictor:
    """Touches a buffer larger than the caches. In the cluster each call starts after other processes ran on the
    core (2 cores, 6+ processes: every exchange switches), so it finds the caches holding their data, not its
    own; timed after an eviction, small expert calls cost what the actors' own compute CPU shows
    (docs/measurements.md)."""

    def __init__(self, nbytes: int = 32 << 20):
        self._buf = torch.zeros(nbytes // 4)

    def __call__(self) -> None:
        self._buf.add_(1.0)


def measure_experts(d: int, f: int, quick: bool = False, distinct: int = 1) -> dict[str, Any]:
    """One expert segment as an expert actor computes it: the model's grouped SwiGLU forward and hand-written
    backward (``model.experts``, what the actor's shards call) plus the weight-grad accumulation of a Backward
    call, on 1 .. 1024 rows, each call on the next of `distinct` experts (cold weights, see
    ``distinct_experts``) after evicting the caches (``_CacheEvictor``), timed one by one in this thread's CPU
    seconds. Forward and backward are each fitted as fixed + per row; the measured points are kept too (the
    host cost model interpolates between them)."""
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(d, 2 * f, generator=g) * 0.02, torch.randn(f, d, generator=g) * 0.02)
               for _ in range(distinct)]  # fmt: skip
    grads = [(torch.zeros_like(w1), torch.zeros_like(w2)) for w1, w2 in weights]
    evict = _CacheEvictor()
    sizes = [1, 8, 32, 128, 512] if quick else [1, 4, 16, 64, 256, 1024]
    calls = 9 if quick else 21
    fwd_t, bwd_t = [], []
    e = 0
    for n in sizes:
        x = torch.randn(n, d, generator=g)
        dy = torch.randn(n, d, generator=g)
        _, hs = grouped_swiglu_forward_saving(x, [n], weights[:1])  # expert 0's activations: same shapes and work
        f_runs, b_runs = [], []
        for i in range(calls + 1):
            e = (e + 1) % distinct
            evict()
            c0 = time.thread_time()
            grouped_swiglu_forward_saving(x, [n], [weights[e]])
            c1 = time.thread_time()
            evict()
            c2 = time.thread_time()
            _, wgrads = grouped_swiglu_backward(dy, [n], x, hs, [weights[e]])
            g1, g2 = grads[e]
            for dw1, dw2 in wgrads:
                g1.add_(dw1)
                g2.add_(dw2)
            c3 = time.thread_time()
            if i:  # the first call is a warm-up
                f_runs.append(c1 - c0)
                b_runs.append(c3 - c2)
        fwd_t.append(statistics.median(f_runs))
        bwd_t.append(statistics.median(b_runs))
    fixed, per_row = fit_line(sizes, fwd_t)
    bfixed, bper_row = fit_line(sizes, bwd_t)
    return {"fixed_s": fixed, "s_per_row": per_row, "bwd_fixed_s": bfixed, "bwd_s_per_row": bper_row,
            "backward_factor": bwd_t[-1] / fwd_t[-1], "rows": sizes, "times_s": fwd_t, "bwd_times_s": bwd_t,
            "distinct_experts": distinct}  # fmt: skip


class _NoExperts(nn.Module):
    """A dispatcher whose experts are the identity: what remains of a decoder layer is its dense part."""

    def __init__(self, num_experts: int, num_layers: int = 1):
        super().__init__()
        self.placement = Placement.contiguous(num_layers, num_experts, 1)

    def forward(self, x_nd: torch.Tensor, plan: Any, ctx: Any = None) -> torch.Tensor:
        return x_nd * 1.0


def _token_sizes(quick: bool) -> list[int]:
    """Sequences per measured batch."""
    return [1, 2, 4] if quick else [1, 2, 4, 8]


def measure_dense(model: ModelConfig, seq_len: int, quick: bool = False) -> dict[str, Any]:
    """The dense part of the decoder layers as a router worker runs it in training: all ``num_layers`` layers
    (their own weights: a real working set, not one layer's weights hot in cache) forward with autograd
    recording, then backward, on 1 .. 8 sequences, with the caches evicted before each layer's forward and
    backward (in the cluster the experts' exchange runs in between; the eviction's own time is not counted);
    per layer = total / layers. Forward fitted as fixed + per token, points kept; backward as a factor."""
    torch.manual_seed(0)
    none = _NoExperts(model.num_experts, model.num_layers)
    layers = [DecoderLayer(model, i, none) for i in range(model.num_layers)]
    L = len(layers)
    evict = _CacheEvictor()
    evicting = [0.0]

    def evict_in_backward(grad: torch.Tensor) -> None:
        c = time.thread_time()
        evict()
        evicting[0] += time.thread_time() - c

    rows, fwd_t, bwd_t = [], [], []
    for b in _token_sizes(quick):
        x = torch.randn(b, seq_len, model.hidden_size, requires_grad=True)
        f_runs, b_runs = [], []
        for rep in range(1 + (3 if quick else 5)):
            h, fwd = x, 0.0
            for layer in layers:
                evict()
                c0 = time.thread_time()
                h, _ = layer(h)
                fwd += time.thread_time() - c0
                h.register_hook(evict_in_backward)  # runs before this layer's backward
            evicting[0] = 0.0
            c1 = time.thread_time()
            h.sum().backward()
            bwd = time.thread_time() - c1 - evicting[0]
            for layer in layers:
                layer.zero_grad(set_to_none=True)
            x.grad = None
            if rep:  # the first run is a warm-up
                f_runs.append(fwd / L)
                b_runs.append(bwd / L)
        fwd_t.append(statistics.median(f_runs))
        bwd_t.append(statistics.median(b_runs))
        rows.append(b * seq_len)
    fixed, per_tok = fit_line(rows, fwd_t)
    return {"fixed_s": fixed, "s_per_token": per_tok, "backward_factor": max(1.0, bwd_t[-1] / fwd_t[-1]),
            "tokens": rows, "times_s": fwd_t, "bwd_times_s": bwd_t, "layers": L}  # fmt: skip


def measure_head(model: ModelConfig, seq_len: int, quick: bool = False) -> dict[str, float]:
    """Embedding + final norm + tied LM head + cross-entropy, forward and forward + backward, on 1 .. 8
    sequences."""
    torch.manual_seed(0)
    embed = nn.Embedding(model.vocab_size, model.hidden_size)
    norm = RMSNorm(model.hidden_size, model.norm_eps)
    rows, fwd_t, tot_t = [], [], []
    for b in _token_sizes(quick):
        tok = torch.randint(0, model.vocab_size, (b, seq_len))
        h = torch.randn(b, seq_len, model.hidden_size)

        def fwd(h: torch.Tensor = h, tok: torch.Tensor = tok) -> torch.Tensor:
            x = embed(tok)
            logits = F.linear(norm(h + x), embed.weight)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tok.reshape(-1))

        with torch.no_grad():
            fwd_t.append(median_time(fwd, 3 if quick else 5, clock=time.process_time))

        def fb() -> None:
            fwd().backward()
            embed.zero_grad(set_to_none=True)
            norm.zero_grad(set_to_none=True)

        tot_t.append(median_time(fb, 3 if quick else 5, clock=time.process_time))
        rows.append(b * seq_len)
    fixed, per_tok = fit_line(rows, fwd_t)
    return {"fixed_s": fixed, "s_per_token": per_tok,
            "backward_factor": max(1.0, (tot_t[-1] - fwd_t[-1]) / fwd_t[-1]), "tokens": rows, "times_s": fwd_t}  # fmt: skip


def measure_optimizer(model: ModelConfig, quick: bool = False) -> dict[str, float]:
    """The optimizer phase as an expert actor runs it, per parameter: gradient norm, clip scaling, AdamW
    (``training.make_adamw``), zeroing the grads; on expert-shaped tensors (foreach over many tensors, as the
    real shards) totalling up to 4 Mi parameters (2**20 quick)."""
    d, f = model.hidden_size, model.ffn_hidden_size
    budget = 1 << 20 if quick else 1 << 22
    per_expert = expert_param_count(model)
    pairs = max(1, budget // per_expert)
    params = []
    for i in range(pairs):
        for name, shape in ((f"w1_{i}", (d, 2 * f)), (f"w2_{i}", (f, d))):
            p = nn.Parameter(torch.randn(*shape) * 0.02)
            p.grad = torch.randn_like(p)
            params.append((name, p))
    opt = make_adamw(params, TrainConfig())
    tensors = [p for _, p in params]

    def phase() -> None:
        sq = sum(float(torch.linalg.vector_norm(p.grad)) ** 2 for p in tensors)
        coef = min(1.0, 1.0 / (sq**0.5 + 1e-6))
        for p in tensors:
            p.grad.mul_(coef)
        opt.step()
        for p in tensors:
            p.grad.zero_()  # AdamW's cost does not depend on the values

    t = median_time(phase, 3 if quick else 5, warmup=2, clock=time.thread_time)
    return {"s_per_param": t / (pairs * per_expert), "params": pairs * per_expert}


def measure_codec(d: int, wire: torch.dtype, quick: bool = False) -> dict[str, float]:
    """``encode_frame`` + ``decode_frame`` of dispatch frames: ``2 * fixed_s + s_per_byte * bytes``."""
    sizes, times = [], []
    for rows in ([4, 64, 1024] if quick else [4, 64, 512, 2048]):
        x = torch.randn(rows, d)

        def enc_dec(x: torch.Tensor = x, rows: int = rows) -> None:
            buf = encode_frame("dispatch", layer=0, step=0, mb=0, pv=0, experts=[0], counts=[rows],
                               tensors={"x": x}, wire_dtype=wire)  # fmt: skip
            decode_frame(buf, out_dtype=torch.float32)

        times.append(median_time(enc_dec, 3 if quick else 5, inner=4, clock=time.process_time))
        sizes.append(rows * d * torch.finfo(wire).bits // 8)
    two_fixed, per_byte = fit_line(sizes, times)
    return {"fixed_s": two_fixed / 2, "s_per_byte": per_byte}
