"""Measure this machine and write a host cost table (``kind: host``) for the simulator.

What is measured, for the config's model, with ``cluster.torch_threads`` intra-op threads (what every actor and
router worker runs with), each as the runtime runs it and on a working set as large as a run's:
- experts (measure.py): one expert segment through the model's grouped SwiGLU forward, hand-written backward and
  weight-grad accumulation (what an expert actor's shards run) on 1 .. 1024 rows, each call on the next of the
  model's experts (cold weights: ``distinct_experts``);
- dense: the decoder layers without their experts (norms, LFA attention, router, DispatchPlan, gather, combine),
  all ``num_layers`` of them forward with autograd recording then backward, on 1 .. 8 sequences;
- head: embedding + final norm + tied LM head + cross-entropy, forward and backward;
- optimizer: an expert actor's optimizer phase (grad norm, clip, AdamW from ``training.make_adamw``, zeroing)
  per parameter, on expert-shaped tensors;
- codec: ``encode_frame`` + ``decode_frame`` of dispatch frames: ``2 * fixed_s + s_per_byte * bytes``;
- RPC (measure_transport.py): Dispatch round trips to a real ``dispatch.server.ExpertServer`` in another
  process, minus the codec: a message costs ``cpu_s`` of a core plus ``bytes / bandwidth``, then waits
  ``alpha_s`` (half a raw TCP round trip measured to the same process);
- allreduce: torch.distributed gloo all_reduce between two processes (the router workers' dense grad sync).
Compute keeps its measured points (the host cost model interpolates between them) and a least-squares line
(fixed + per row / token) for other model sizes. The table describes this machine idle, one process at a time.
The real cluster's processes use more CPU for the same work (shared caches, Python, gRPC and Ray;
docs/measurements.md): ``runtime.calibrate_cluster.measure_cluster_cpu_scale`` measures that against the
config's local cluster (``simulate --calibrate --against-cluster`` writes it into the table as ``cpu_scale``;
``benchmarks/sim_accuracy.py`` measures it per run).

``host_cores`` is the number of CPUs this process may use: every process of a local cluster shares them.
``step_overhead_s`` (the control plane around one step: Ray calls, norms, clip) is 0 unless given, e.g. from a
live cluster (``benchmarks/sim_accuracy.py`` measures it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from moe_runtime.config import RuntimeConfig
from moe_runtime.malloc import tune_malloc
from moe_runtime.sim.cost_model import dense_flops_per_token, head_flops_per_token
from moe_runtime.sim.measure import (
    distinct_experts,
    machine_state,
    measure_codec,
    measure_dense,
    measure_experts,
    measure_head,
    measure_optimizer,
)
from moe_runtime.sim.measure_transport import measure_allreduce, measure_rpc

__all__ = ["calibrate", "write_table"]


def calibrate(cfg: RuntimeConfig, quick: bool = False, step_overhead_s: float = 0.0,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Measure everything and return the host table as a dict (see ``write_table``)."""
    say = log or (lambda _msg: None)
    # The runtime's processes keep large buffers resident (the expert server and client tune malloc); with glibc's
    # defaults every MB-sized activation is page-faulted afresh, which over-predicts steps (docs/measurements.md).
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
                "dense_flops_per_token": dense_flops_per_token(m, seq),
                "head_flops_per_token": head_flops_per_token(m),
            },  # fmt: skip
            "expert": expert,
            "dense": dense,
            "head": head,
            "optimizer": opt,
            "codec": codec,
            "rpc": rpc,
            "allreduce": allreduce,
        },
    }


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
        "# kind: host = every process of the local cluster shares host_cores cores; see sim/host_cost.py.\n"
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + yaml.safe_dump(_plain(table), sort_keys=False))
    tmp.replace(path)
    return path
