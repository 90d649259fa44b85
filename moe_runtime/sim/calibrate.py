"""Measure this machine and write a host cost table (``kind: host``) for the simulator.

What is measured, for the config's model, with ``cluster.torch_threads`` intra-op threads (what every actor and
router worker runs with), each as the runtime runs it and on a working set as large as a run's:
- experts: one expert segment through the expert server's own forward and backward (``ExpertServer``'s grouped
  SwiGLU, hand-written backward, weight-grad accumulation) on 1 .. 1024 rows, each call on the next of the
  model's experts (cold weights: ``distinct_experts``);
- dense: the decoder layers without their experts (norms, LFA attention, router, DispatchPlan, gather, combine),
  all ``num_layers`` of them forward with autograd recording then backward, on 1 .. 8 sequences;
- head: embedding + final norm + tied LM head + cross-entropy, forward and backward;
- optimizer: an expert actor's optimizer phase (grad norm, clip, AdamW from ``training.make_adamw``, zeroing)
  per parameter, on expert-shaped tensors;
- codec: ``encode_frame`` + ``decode_frame`` of dispatch frames: ``2 * fixed_s + s_per_byte * bytes``;
- RPC: Dispatch round trips to a real ``ExpertServer`` (``dispatch.grpc_service``) in another process, minus the
  codec: a message costs ``cpu_s`` of a core plus ``bytes / bandwidth``, then waits ``alpha_s`` (half a raw TCP
  round trip measured to the same process);
- allreduce: torch.distributed gloo all_reduce between two processes (the router workers' dense grad sync).
Compute keeps its measured points (``CostModel`` interpolates between them) and a least-squares line (fixed +
per row / token) for other model sizes. Every figure is the median of several runs. The machine is shared, so
in-process compute is timed in this thread's CPU seconds (they do not grow with other tenants' load) and the
multi-process measurements (RPC, all-reduce) are wall times divided by the stretch ``machine_state`` measured
around them: the table describes this machine idle, one process at a time. The real cluster's processes use more
CPU for the same work (shared caches, Python, gRPC and Ray: 1.05-1.5x measured here); ``measure_cluster_cpu_scale``
measures that against the config's local cluster (``simulate --calibrate --against-cluster`` writes it into the
table as ``cpu_scale``; ``benchmarks/sim_accuracy.py`` measures it per run).

``host_cores`` is the number of CPUs this process may use: every process of a local cluster shares them.
``step_overhead_s`` (the control plane around one step: Ray calls, norms, clip) is 0 unless given, e.g. from a
live cluster (``benchmarks/sim_accuracy.py`` measures it).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from moe_runtime.config import ModelConfig, RuntimeConfig
from moe_runtime.model.accounting import count_params, flops_per_token
from moe_runtime.sim.cost_model import HardwareTable, scale_host_table

__all__ = [
    "calibrate",
    "distinct_experts",
    "machine_state",
    "measure_allreduce",
    "measure_cluster_cpu_scale",
    "measure_codec",
    "measure_dense",
    "measure_experts",
    "measure_head",
    "measure_optimizer",
    "measure_rpc",
    "processes_cpu_s",
    "scale_host_table",
    "write_table",
]  # fmt: skip


def _median_time(fn: Callable[[], Any], repeats: int, inner: int = 1, warmup: int = 1,
                 clock: Callable[[], float] = time.perf_counter) -> float:
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


def _fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x with a, b >= 0."""
    b, a = np.polyfit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), 1)
    if b < 0:
        return float(np.mean(y)), 0.0
    if a < 0:
        return 0.0, float(np.dot(x, y) / np.dot(x, x))
    return float(a), float(b)


# ----------------------------------------------------------------------------------------------- compute


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
    the cores). ``scale_host_table(table, stretch)`` turns a calibrated table (CPU seconds) into wall seconds."""
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


def distinct_experts(model: ModelConfig, cap_bytes: int = 256 << 20) -> int:
    """How many distinct experts the calibration cycles through: all of the model's (layers x experts), at most
    `cap_bytes` of fp32 weights. A run touches every expert's weights once per exchange with the other processes
    running in between, so they come from memory, not cache; timing one expert over and over keeps its weights in
    cache and measured 1.1-2.2x less CPU here (16-256 rows, d 256, f 512)."""
    per_expert = 3 * model.hidden_size * model.ffn_hidden_size * 4
    return int(max(1, min(model.num_layers * model.num_experts, cap_bytes // per_expert)))


class _CacheEvictor:
    """Touches a buffer larger than the caches. In the cluster each call starts after other processes ran on the
    core (2 cores, 6+ processes: every exchange switches), so it finds the caches holding their data, not its
    own: timed here after an eviction, expert calls cost 1.2-1.9x the CPU of back-to-back calls at 16-128 rows
    (no change at 512), which is what the actors' measured compute CPU showed against the old table (1.4-1.6x)."""

    def __init__(self, nbytes: int = 32 << 20):
        self._buf = torch.zeros(nbytes // 4)

    def __call__(self) -> None:
        self._buf.add_(1.0)


def measure_experts(d: int, f: int, quick: bool = False, distinct: int = 1) -> dict[str, Any]:
    """One expert segment as the expert server computes it: ``ExpertServer._expert_forward`` and
    ``_expert_backward`` plus the weight-grad accumulation of a Backward call (the server's own code, not a
    re-implementation), on 1 .. 1024 rows, each call on the next of `distinct` experts (cold weights, see
    ``distinct_experts``) after evicting the caches (``_CacheEvictor``), timed one by one in this thread's CPU
    seconds. Forward and backward are each fitted as fixed + per row; the measured points are kept too
    (``CostModel`` interpolates between them)."""
    from moe_runtime.dispatch.grpc_service import ExpertServer

    g = torch.Generator().manual_seed(0)
    shards = {(0, e): (torch.randn(d, 2 * f, generator=g) * 0.02, torch.randn(f, d, generator=g) * 0.02)
              for e in range(distinct)}  # fmt: skip
    server = ExpertServer(shards, auth_token="calibration")  # never started: no socket
    grads = server.grads()
    evict = _CacheEvictor()
    sizes = [1, 8, 32, 128, 512] if quick else [1, 4, 16, 64, 256, 1024]
    calls = 9 if quick else 21
    fwd_t, bwd_t = [], []
    e = 0
    for n in sizes:
        x = torch.randn(n, d, generator=g)
        dy = torch.randn(n, d, generator=g)
        _, hs = server._expert_forward(0, [0], [n], x)  # expert 0's activations: same shapes, same work
        f_runs, b_runs = [], []
        for i in range(calls + 1):
            e = (e + 1) % distinct
            evict()
            c0 = time.thread_time()
            server._expert_forward(0, [e], [n], x)
            c1 = time.thread_time()
            evict()
            c2 = time.thread_time()
            _, wgrads = server._expert_backward(0, [e], [n], x, hs, dy)
            g1, g2 = grads[(0, e)]
            for _, dw1, dw2 in wgrads:
                g1.add_(dw1)
                g2.add_(dw2)
            c3 = time.thread_time()
            if i:  # the first call is a warm-up
                f_runs.append(c1 - c0)
                b_runs.append(c3 - c2)
        fwd_t.append(statistics.median(f_runs))
        bwd_t.append(statistics.median(b_runs))
    fixed, per_row = _fit(sizes, fwd_t)
    bfixed, bper_row = _fit(sizes, bwd_t)
    return {"fixed_s": fixed, "s_per_row": per_row, "bwd_fixed_s": bfixed, "bwd_s_per_row": bper_row,
            "backward_factor": bwd_t[-1] / fwd_t[-1], "rows": sizes, "times_s": fwd_t, "bwd_times_s": bwd_t,
            "distinct_experts": distinct}  # fmt: skip


class _NoExperts(nn.Module):
    """A dispatcher whose experts are the identity: what remains of a decoder layer is its dense part."""

    def __init__(self, num_experts: int, num_layers: int = 1):
        super().__init__()
        from moe_runtime.placement import Placement

        self.placement = Placement.contiguous(num_layers, num_experts, 1)

    def forward(self, x_nd: torch.Tensor, plan: Any) -> torch.Tensor:
        return x_nd * 1.0


def _token_sizes(seq_len: int, quick: bool) -> list[int]:
    return [1, 2, 4] if quick else [1, 2, 4, 8]


def measure_dense(model: ModelConfig, seq_len: int, quick: bool = False) -> dict[str, Any]:
    """The dense part of the decoder layers as a router worker runs it in training: all ``num_layers`` layers
    (their own weights: a real working set, not one layer's weights hot in cache) forward with autograd
    recording, then backward, on 1 .. 8 sequences, with the caches evicted before each layer's forward and
    backward (in the cluster the experts' exchange runs in between; the eviction's own time is not counted);
    per layer = total / layers. Forward fitted as fixed + per token, points kept; backward as a factor."""
    from moe_runtime.model.transformer import DecoderLayer

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
    for b in _token_sizes(seq_len, quick):
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
    fixed, per_tok = _fit(rows, fwd_t)
    return {"fixed_s": fixed, "s_per_token": per_tok, "backward_factor": max(1.0, bwd_t[-1] / fwd_t[-1]),
            "tokens": rows, "times_s": fwd_t, "bwd_times_s": bwd_t, "layers": L}  # fmt: skip


def measure_head(model: ModelConfig, seq_len: int, quick: bool = False) -> dict[str, float]:
    from moe_runtime.model.norm import RMSNorm

    torch.manual_seed(0)
    embed = nn.Embedding(model.vocab_size, model.hidden_size)
    norm = RMSNorm(model.hidden_size, model.norm_eps)
    rows, fwd_t, tot_t = [], [], []
    for b in _token_sizes(seq_len, quick):
        tok = torch.randint(0, model.vocab_size, (b, seq_len))
        h = torch.randn(b, seq_len, model.hidden_size)

        def fwd(h: torch.Tensor = h, tok: torch.Tensor = tok) -> torch.Tensor:
            x = embed(tok)
            logits = F.linear(norm(h + x), embed.weight)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tok.reshape(-1))

        with torch.no_grad():
            fwd_t.append(_median_time(fwd, 3 if quick else 5, clock=time.process_time))

        def fb() -> None:
            fwd().backward()
            embed.zero_grad(set_to_none=True)
            norm.zero_grad(set_to_none=True)

        tot_t.append(_median_time(fb, 3 if quick else 5, clock=time.process_time))
        rows.append(b * seq_len)
    fixed, per_tok = _fit(rows, fwd_t)
    return {"fixed_s": fixed, "s_per_token": per_tok,
            "backward_factor": max(1.0, (tot_t[-1] - fwd_t[-1]) / fwd_t[-1]), "tokens": rows, "times_s": fwd_t}  # fmt: skip


def measure_optimizer(model: ModelConfig | None = None, quick: bool = False) -> dict[str, float]:
    """The optimizer phase as an expert actor runs it, per parameter: gradient norm, clip scaling, AdamW
    (``training.make_adamw``), zeroing the grads; on expert-shaped tensors (foreach over many tensors, as the
    real shards) totalling up to 4 Mi parameters (2**20 quick)."""
    from moe_runtime.config import TrainConfig
    from moe_runtime.training import make_adamw

    d, f = (model.hidden_size, model.ffn_hidden_size) if model else (1024, 1024)
    budget = 1 << 20 if quick else 1 << 22
    per_expert = 3 * d * f
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

    t = _median_time(phase, 3 if quick else 5, warmup=2, clock=time.thread_time)
    return {"s_per_param": t / (pairs * per_expert), "params": pairs * per_expert}


def measure_codec(d: int, wire: torch.dtype, quick: bool = False) -> dict[str, float]:
    from moe_runtime.dispatch.codec import decode_frame, encode_frame

    sizes, times = [], []
    for rows in ([4, 64, 1024] if quick else [4, 64, 512, 2048]):
        x = torch.randn(rows, d)

        def enc_dec(x: torch.Tensor = x, rows: int = rows) -> None:
            buf = encode_frame("dispatch", layer=0, step=0, mb=0, pv=0, experts=[0], counts=[rows],
                               tensors={"x": x}, wire_dtype=wire)  # fmt: skip
            decode_frame(buf, out_dtype=torch.float32)

        times.append(_median_time(enc_dec, 3 if quick else 5, inner=4, clock=time.process_time))
        sizes.append(rows * d * torch.finfo(wire).bits // 8)
    two_fixed, per_byte = _fit(sizes, times)
    return {"fixed_s": two_fixed / 2, "s_per_byte": per_byte}


# ----------------------------------------------------------------------------------------------- processes


def _child(code: str, *args: object) -> subprocess.Popen:
    """A fresh interpreter running `code` (a call into this module) with args in argv: no multiprocessing, so
    it works from any caller (scripts without a __main__ guard included)."""
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip


def _serve_main() -> None:
    """Child process: an ExpertServer with one tiny shard (compute ~ 0) and a raw TCP echo socket. Prints
    "address echo_port", serves until stdin closes."""
    d, token = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    from moe_runtime.dispatch.grpc_service import ExpertServer

    server = ExpertServer({(0, 0): (torch.zeros(d, 2), torch.zeros(1, d))}, "127.0.0.1", 0, auth_token=token)
    address = server.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)

    def echo() -> None:
        c, _ = sock.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := c.recv(64):
            c.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    print(address, sock.getsockname()[1], flush=True)
    sys.stdin.read()
    server.stop(0)


def measure_rpc(d: int, wire: torch.dtype, codec: dict[str, float], quick: bool = False) -> dict[str, float]:
    """Dispatch round trips through the real data plane to a server in another process."""
    from moe_runtime.dispatch.codec import decode_frame, encode_frame
    from moe_runtime.dispatch.grpc_service import ExpertClient

    token = secrets.token_hex(8)
    proc = _child("from moe_runtime.sim.calibrate import _serve_main; _serve_main()", d, token)
    try:
        line = proc.stdout.readline().split()
        if len(line) != 2:
            raise RuntimeError("calibration server did not start")
        address, echo_port = line[0], int(line[1])
        s = socket.create_connection(("127.0.0.1", echo_port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def ping() -> None:
            s.sendall(b"x" * 16)
            s.recv(64)

        stretch0 = machine_state()["stretch"]
        tcp_rtt = _median_time(ping, 5, inner=50)
        s.close()
        client = ExpertClient(address, token)
        sizes, rtts = [], []
        step = [0]
        for rows in ([4, 256, 2048] if quick else [4, 64, 512, 2048, 4096]):
            x = torch.randn(rows, d)

            def rtt(x: torch.Tensor = x, rows: int = rows) -> None:
                step[0] += 1
                buf = encode_frame("dispatch", layer=0, step=step[0], mb=0, pv=0, experts=[0], counts=[rows],
                                   tensors={"x": x}, wire_dtype=wire, meta={"save": False})  # fmt: skip
                decode_frame(client.dispatch(buf).result(), out_dtype=torch.float32)

            rtts.append(_median_time(rtt, 5 if quick else 7, inner=3, warmup=3))
            sizes.append(rows * d * torch.finfo(wire).bits // 8)
        client.close()
        stretch = (stretch0 + machine_state()["stretch"]) / 2
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    # wall times on a shared machine: divide by how stretched a process was then (machine_state)
    rtts = [t / stretch for t in rtts]
    tcp_rtt /= stretch
    intercept, slope = _fit(sizes, rtts)
    alpha = tcp_rtt / 2
    # RTT = 2 (cpu + alpha) + 2 bytes / bw + 2 codec(bytes), codec(b) = 2 fixed + per_byte b
    cpu = max(0.0, (intercept - 4 * codec["fixed_s"]) / 2 - alpha)
    inv_bw = max(slope / 2 - codec["s_per_byte"], 1e-12)
    return {"alpha_s": alpha, "cpu_s": cpu, "bandwidth": 1.0 / inv_bw, "rtt_intercept_s": intercept,
            "rtt_s_per_byte": slope, "tcp_rtt_s": tcp_rtt, "bytes": sizes, "rtt_s": rtts, "stretch": stretch}  # fmt: skip


def _allreduce_main() -> None:
    """Child process: rank argv[1] of a 2-rank gloo group on port argv[2]; rank 0 prints the times as JSON."""
    import json

    import torch.distributed as dist

    rank, port, sizes = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    res = []
    for n in sizes:
        t = torch.ones(n // 4)
        res.append(_median_time(lambda t=t: dist.all_reduce(t), 5, warmup=2))
    dist.destroy_process_group()
    print(json.dumps(res), flush=True)


def measure_allreduce(quick: bool = False) -> dict[str, float]:
    """gloo all_reduce between two processes: a 2-rank ring takes 2 alpha + bytes / bandwidth."""
    import json

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sizes = [1 << 12, 1 << 20, 1 << 22] if quick else [1 << 12, 1 << 20, 1 << 22, 1 << 24]
    code = "from moe_runtime.sim.calibrate import _allreduce_main; _allreduce_main()"
    stretch0 = machine_state()["stretch"]
    procs = [_child(code, r, port, json.dumps(sizes)) for r in range(2)]
    try:
        out = [p.communicate(timeout=300)[0] for p in procs]
        stretch = (stretch0 + machine_state()["stretch"]) / 2
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"gloo all-reduce calibration failed (exit codes {[p.returncode for p in procs]})")
    times = [t / stretch for t in json.loads(out[0].strip().splitlines()[-1])]
    intercept, slope = _fit(sizes, times)
    return {"alpha_s": intercept / 2, "bandwidth": 1.0 / max(slope, 1e-12), "bytes": sizes, "times_s": times,
            "stretch": stretch}  # fmt: skip


# ----------------------------------------------------------------------------------------------- table


def calibrate(cfg: RuntimeConfig, quick: bool = False, step_overhead_s: float = 0.0,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Measure everything and return the host table as a dict (see ``write_table``)."""
    from moe_runtime.dispatch.grpc_service import tune_malloc

    say = log or (lambda _msg: None)
    # The runtime's processes keep large buffers resident (ExpertServer and ExpertClient tune malloc); measured
    # with glibc's defaults, every MB-sized activation was page-faulted afresh: the dense layers' backward on 8
    # sequences cost 2.8x the 4-sequence one and 1-worker steps were over-predicted by 20-30%.
    tune_malloc()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.cluster.torch_threads)
    try:
        m, seq = cfg.model, cfg.train.seq_len
        wire = getattr(torch, cfg.transport.wire_dtype)
        t0 = time.perf_counter()
        say("experts")
        expert = measure_experts(m.hidden_size, m.ffn_hidden_size, quick, distinct_experts(m))
        say("dense layer")
        dense = measure_dense(m, seq, quick)
        say("head")
        head = measure_head(m, seq, quick)
        say("optimizer")
        opt = measure_optimizer(m, quick)
        say("codec")
        codec = measure_codec(m.hidden_size, wire, quick)
        say("gRPC round trips")
        rpc = measure_rpc(m.hidden_size, wire, codec, quick)
        say("gloo all-reduce")
        allreduce = measure_allreduce(quick)
    finally:
        torch.set_num_threads(threads)
    state = machine_state()
    counts = count_params(m)
    fl = flops_per_token(m, seq)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {
        "name": "calibrated-host",
        "kind": "host",
        "host_cores": cores,
        "step_overhead_s": float(step_overhead_s),
        "grad_bytes_per_param": 4,
        "links": {"loopback": {k: rpc[k] for k in ("alpha_s", "cpu_s", "bandwidth")}},
        "measured": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": time.perf_counter() - t0,
            "torch_threads": cfg.cluster.torch_threads,
            "machine_state": state,
            "wire_dtype": cfg.transport.wire_dtype,
            "model": {
                "preset": m.preset, "hidden_size": m.hidden_size, "ffn_hidden_size": m.ffn_hidden_size,
                "num_experts": m.num_experts, "seq_len": seq,
                "dense_flops_per_token": 2.0 * counts.dense_params_per_layer
                + fl["attention_score_flops_per_token_causal"] / m.num_layers,
                "head_flops_per_token": 2.0 * m.vocab_size * m.hidden_size,
            },
            "expert": expert,
            "dense": dense,
            "head": head,
            "optimizer": opt,
            "codec": codec,
            "rpc": rpc,
            "allreduce": allreduce,
        },
    }


def processes_cpu_s(procs: list) -> float:
    """User + system CPU seconds of `procs` (psutil.Process) so far; a process that ended meanwhile counts 0."""
    import psutil

    total = 0.0
    for p in procs:
        try:
            total += sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def ray_round_trip(cluster: Any, n: int = 20) -> float:
    """Median seconds of a Ray actor call that does nothing (a router worker's ping)."""
    import ray

    h = cluster.workers[0]
    ray.get(h.ping.remote())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        ray.get(h.ping.remote())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_cluster_cpu_scale(cfg: RuntimeConfig, table: HardwareTable, warmup: int = 2, steps: int = 3,
                              log: Callable[[str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Calibrate a host table against the real local cluster: start the config's cluster (``Cluster.start``),
    train `warmup` steps (dropped: optimizer state and allocators grow), then `steps` steps, each recording its
    routing per worker and micro-batch and the CPU seconds of every process of the run (this one and its
    descendants: Ray, router workers, expert actors). ``cpu_scale`` = those CPU seconds / the CPU work the
    table gives the same routing (measured here: 1.05-1.5x; the cluster's processes share caches and carry
    Python, gRPC and Ray costs that single-process measurements miss); ``step_overhead_s`` = the driver's 3
    Ray round trips per step. Put both in the table (``calibrate --against-cluster`` does)."""
    import psutil

    from moe_runtime.runtime.cluster import Cluster
    from moe_runtime.sim.simulator import Simulator

    say = log or (lambda _msg: None)
    sim = Simulator.from_config(cfg, dataclasses.replace(table, cpu_scale=1.0))
    cluster_cpu, sim_cpu = [], []
    with Cluster.start(cfg) as cluster:
        rtt = ray_round_trip(cluster)
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        for i in range(warmup + steps):
            c0 = processes_cpu_s(procs)
            rep = cluster.train_step()
            used = processes_cpu_s(procs) - c0
            if i < warmup:
                continue
            counts = np.stack([np.asarray(x, dtype=np.int64) for x in rep.worker_loads])
            cluster_cpu.append(used)
            sim_cpu.append(sim.run_step(counts).phases["cpu_work_s"])
            say(f"step {i}: cluster {used:.2f} CPU s, table {sim_cpu[-1]:.2f} CPU s")
    return {"cpu_scale": sum(cluster_cpu) / sum(sim_cpu), "step_overhead_s": 3 * rtt, "ray_round_trip_s": rtt,
            "cluster_cpu_s": cluster_cpu, "table_cpu_s": sim_cpu, "warmup": warmup}  # fmt: skip


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def write_table(table: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# Host cost table measured on this machine by moe_runtime.sim.calibrate (moe-runtime simulate --calibrate).\n"
        "# kind: host = every process of the local cluster shares host_cores cores; see sim/cost_model.py.\n"
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + yaml.safe_dump(_plain(table), sort_keys=False))
    tmp.replace(path)
    return path
