"""The Yuan 2.0-M32 slice at its real width (cluster/yuan-m32-slice.yaml) through the cluster, against its limits.

A random-weight checkpoint of the slice (bf16 on disk, moe_runtime.checkpoint.synthetic) is written to a temporary
directory (--quick: kept in runs/cache between runs, benchmarks/_checkpoint_cache.py; or --checkpoint names one), loaded onto the cluster, and one prefill of --tokens tokens is timed; then the
cluster is shut down and the same checkpoint is loaded in this process and timed the same way (one heavy party at a
time: this machine has 24 GB). Measured, each against its baseline or limit:
1. prefill tokens/s, cluster vs in-process (same tokens; the in-process model runs with every core);
2. bytes on the wire per token (the expert servers' bytes in + out) vs the minimum, 2 x top_k x hidden x wire bytes
   per MoE layer (each token copy goes to its expert and comes back once);
3. peak RSS of every party (VmHWM) vs what it must hold: an expert actor its shards' weights in their storage
   dtype (bf16 in the slice: model.expert_weight_dtype) + grad buffers if it has any (allocated at the first
   backward: none here), a router worker its dense fp32 parameters; the driver's peak during the load vs the
   largest tensor; and each party's RSS over the repeated prefills and generations (flat = nothing accumulates);
4. checkpoint load time (every party reading its own tensors in parallel) vs reading the same files once from
   this process (page cache warm for both: the files were just written or read), the physical limit, and vs
   loading the same checkpoint into one in-process model (the same conversions: bf16 -> fp32, the expert
   transposes; the actors also copy each shard once more into their own tensors).
5. decode tokens/s (cached greedy generation, benchmarks/_real_width_decode.py), cluster vs in process, and
   whether the two produce the same tokens.
The cluster and the in-process model run one after the other (both at once do not fit at 32 experts), so the
ratios are of medians over --reps runs each, not of interleaved rounds; min-max are reported.
Logits of the two runs are compared (max relative error). --quick: 2 layers of 4 experts, 64 tokens, decode
batches 1 and 4 of 4 new tokens.
Writes runs/bench/real_width.json and prints it as the last stdout line.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
import yaml

from benchmarks._checkpoint_cache import cached_random_checkpoint
from benchmarks._common import emit, int_list, make_parser, stderr_console
from benchmarks._real_width_decode import compare, decode_rows
from moe_runtime.checkpoint.run_config import resolve_checkpoint, run_overrides
from moe_runtime.checkpoint.synthetic import write_random_checkpoint
from moe_runtime.runtime import party_pool
from moe_runtime.config import ModelConfig
from moe_runtime.runtime.party_rss import proc_memory

SLICE = ROOT / "cluster" / "yuan-m32-slice.yaml"


def _read_files(directory: Path) -> tuple[float, int]:
    """Seconds to read every weight file once into a reused 64 MiB buffer, and the bytes read."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return time.perf_counter() - t0, total


def _time(fn: Any, reps: int) -> tuple[list[float], Any]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def _parties(cluster: Any) -> dict[str, int]:
    st = cluster.status()
    pids = {f"actor {a['index']}": a["pid"] for a in st["expert_actors"]}
    pids.update({f"worker {w['index']}": w["pid"] for w in st["router_workers"]})
    return pids


def _wire_bytes(cluster: Any) -> int:
    return sum(a["bytes_in"] + a["bytes_out"] for a in cluster.status()["expert_actors"])


def run(args: Any) -> dict[str, Any]:
    from moe_runtime.checkpoint.in_process import load_model
    from moe_runtime.runtime.cluster import Cluster
    from moe_runtime.generation.backend import LocalBackend
    from moe_runtime.generation.engine import Engine
    from moe_runtime.runtime.hf_loading import current_rss, peak_rss, reset_peak_rss

    con = stderr_console()
    load_start = os.getloadavg()[0]  # this machine is shared: say how busy it was
    data = yaml.safe_load(Path(args.config).read_text())
    layers, experts, tokens = (2, 4, 64) if args.quick else (args.layers, args.experts, args.tokens)
    # quick: 4 new tokens (3 decode steps per row; the steps' rate varied ~3% over reps at 8): decode was ~60% of
    # the quick wall time
    decode_batches, decode_new = ([1, 4], 4) if args.quick else (args.decode_batches, args.decode_tokens)
    if args.reps is None:  # quick: 2 (a rep is ~10 s of the quick run: 2 prefills, 4 generations)
        args.reps = 2 if args.quick else 3
    if layers is not None:
        data["model"]["num_layers"] = layers
    if experts is not None:
        data["model"]["num_experts"] = experts
    model = ModelConfig(**data["model"])
    m = model
    with tempfile.TemporaryDirectory(prefix="real_width_") as tmp:
        if args.checkpoint is not None:
            directory, source = Path(args.checkpoint), "given"
        elif args.quick:  # the same checkpoint every quick run: kept in runs/cache (benchmarks/_checkpoint_cache.py)
            t0 = time.perf_counter()
            directory, reused = cached_random_checkpoint("real_width_quick", model, dtype=torch.bfloat16,
                                                         max_shard_bytes=1 << 30)
            source = "cached" if reused else "written"
            con.print(f"{source} a random {m.num_layers}-layer x {m.num_experts}-expert checkpoint in "
                      f"{time.perf_counter() - t0:.1f} s: {directory}")
        else:
            t0 = time.perf_counter()
            directory, source = write_random_checkpoint(Path(tmp) / "ck", model, dtype=torch.bfloat16,
                                                        max_shard_bytes=1 << 30), "written"
            con.print(f"wrote a random {m.num_layers}-layer x {m.num_experts}-expert checkpoint in "
                      f"{time.perf_counter() - t0:.1f} s")
        cfg = resolve_checkpoint(data, str(args.config), directory)
        if source == "cached":  # the limit is a read from the page cache, as right after a write: warm it first
            _read_files(directory)
        read_s, disk_bytes = _read_files(directory)
        ids = torch.randint(0, m.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
        wire = torch.finfo(getattr(torch, cfg.transport.wire_dtype)).bits // 8
        min_wire_per_token = 2 * m.top_k * m.hidden_size * wire * m.num_layers

        base_driver = current_rss()
        with Cluster.start(cfg) as cluster:
            load = cluster.hf_load
            pids = _parties(cluster)
            cluster.forward(ids)  # warm-up: first-touch of every buffer
            before = _wire_bytes(cluster)
            rss_series = {p: [] for p in pids}

            def prefill() -> torch.Tensor:
                out = cluster.forward(ids)
                for p, pid in pids.items():
                    rss_series[p].append(proc_memory(pid)["VmRSS"])
                return out

            cluster_times, cluster_logits = _time(prefill, args.reps)
            wire_per_token = (_wire_bytes(cluster) - before) / (args.reps * tokens)
            cluster_decode = decode_rows(cluster.generation_engine(), m.vocab_size, decode_batches, decode_new,
                                         args.reps)
            for p, pid in pids.items():
                rss_series[p].append(proc_memory(pid)["VmRSS"])
            procs = {p: proc_memory(pid) for p, pid in pids.items()}
            import ray

            actor_stats = {f"actor {i}": st for i, st in enumerate(ray.get([a.stats.remote()
                                                                         for a in cluster.experts]))}
        # under benchmarks/_suite.py the closed cluster is parked (its ~6 GiB of weights held); no later benchmark
        # uses this layout, and the in-process baseline ran 1.5-3x slower beside them (load 5.7-12.8 s, not 3.7)
        party_pool.release_parked()
        totals = load.totals()
        parties = {}
        for p, st in procs.items():
            t = totals[p]
            must = t["held_bytes"]  # weights in their storage dtype
            if p.startswith("actor"):
                must += actor_stats[p]["grad_bytes"]  # 0 unless a backward ran
            baseline = load.parties[p][0].memory.rss_before
            parties[p] = {"peak_rss": st["VmHWM"], "must_hold": must, "peak_load_delta": t["peak_delta"],
                          "rss_before_load": baseline,
                          "peak_rss_minus_baseline_vs_must_hold": (st["VmHWM"] - baseline) / max(must, 1),
                          "peak_load_delta_vs_must_hold": t["peak_delta"] / max(must, 1),
                          "rss_over_prefills": rss_series[p],
                          "rss_drift": (rss_series[p][-1] - rss_series[p][0]) if rss_series[p] else 0}

        threads = torch.get_num_threads()
        reset_peak_rss()
        before_local = current_rss()
        t_load = time.perf_counter()
        local = load_model(directory, **run_overrides(cfg.model)).eval()
        local_load_s = time.perf_counter() - t_load
        with torch.no_grad():
            local(ids)  # warm-up
            local_times, local_logits = _time(lambda: local(ids).logits, args.reps)
            local_decode = decode_rows(Engine(LocalBackend(local)), m.vocab_size, decode_batches, decode_new,
                                       args.reps)
        local_peak = peak_rss() - before_local
        local_must = sum(p.nbytes for p in local.parameters())
    diff = float((cluster_logits.double() - local_logits.double()).abs().max() / local_logits.double().abs().max())
    c_med, l_med = statistics.median(cluster_times), statistics.median(local_times)
    result = {
        "model": {"hidden": m.hidden_size, "heads": m.num_heads, "head_dim": m.head_dim, "rotary_dim": m.rotary_dim,
                  "layers": m.num_layers, "experts": m.num_experts, "ffn": m.ffn_hidden_size, "vocab": m.vocab_size,
                  "top_k": m.top_k},
        "tokens": tokens, "reps": args.reps, "quick": bool(args.quick),
        "expert_actors": cfg.cluster.expert_actors, "router_workers": cfg.cluster.router_workers,
        "prefill_tokens_per_s_cluster": tokens / c_med, "prefill_tokens_per_s_in_process": tokens / l_med,
        "prefill_cluster_vs_in_process": l_med / c_med, "in_process_threads": threads,
        "logits_max_rel_diff": diff,
        "wire_bytes_per_token": wire_per_token, "wire_bytes_per_token_min": min_wire_per_token,
        "wire_vs_min": wire_per_token / min_wire_per_token,
        "checkpoint_source": source,  # written now, cached (an earlier quick run wrote it), or given
        "checkpoint_bytes": disk_bytes, "checkpoint_load_s": load.seconds, "disk_read_s": read_s,
        "load_vs_disk_read": load.seconds / read_s,
        "in_process_load_s": local_load_s, "load_vs_in_process_load": load.seconds / local_load_s,
        "driver_load_peak_delta": load.driver.peak_delta if load.driver else None,
        "largest_tensor_bytes": load.largest_tensor_bytes,
        "driver_peak_vs_largest_tensor": (load.driver.peak_delta / load.largest_tensor_bytes) if load.driver else None,
        "driver_rss_baseline": base_driver,
        "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
        "in_process_peak_delta": local_peak, "in_process_must_hold": local_must,
        "in_process_peak_vs_must_hold": local_peak / max(local_must, 1),
        "expert_weight_dtype": m.expert_weight_dtype,
        "parties": parties,
        "decode": compare(cluster_decode, local_decode),
    }
    _table(con, result)
    return result


def _table(con: Any, r: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"real width: {r['model']['layers']} layers x {r['model']['experts']} experts, "
                    f"hidden {r['model']['hidden']}, {r['tokens']} tokens")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_column("baseline / limit", justify="right")
    t.add_column("ratio", justify="right")
    t.add_row("prefill tokens/s (cluster)", f"{r['prefill_tokens_per_s_cluster']:.1f}",
              f"{r['prefill_tokens_per_s_in_process']:.1f} in process", f"{r['prefill_cluster_vs_in_process']:.2f}")
    t.add_row("wire bytes / token", f"{r['wire_bytes_per_token']:,.0f}", f"{r['wire_bytes_per_token_min']:,} min",
              f"{r['wire_vs_min']:.3f}")
    t.add_row("checkpoint load s (cluster)", f"{r['checkpoint_load_s']:.2f}", f"{r['disk_read_s']:.2f} read once",
              f"{r['load_vs_disk_read']:.2f}")
    t.add_row("", "", f"{r['in_process_load_s']:.2f} one process", f"{r['load_vs_in_process_load']:.2f}")
    t.add_row("driver peak during load", f"{(r['driver_load_peak_delta'] or 0) / 2**20:,.1f} MiB",
              f"{r['largest_tensor_bytes'] / 2**20:,.1f} MiB largest tensor",
              f"{r['driver_peak_vs_largest_tensor'] or 0:.3f}")
    for p, v in r["parties"].items():
        t.add_row(f"{p} load peak (+)", f"{v['peak_load_delta'] / 2**20:,.0f} MiB",
                  f"{v['must_hold'] / 2**20:,.0f} MiB must hold", f"{v['peak_load_delta_vs_must_hold']:.2f}")
        t.add_row(f"{p} peak RSS / drift", f"{v['peak_rss'] / 2**20:,.0f} MiB",
                  f"drift {v['rss_drift'] / 2**20:+.1f} MiB", "")
    t.add_row("in-process peak (+)", f"{r['in_process_peak_delta'] / 2**20:,.0f} MiB",
              f"{r['in_process_must_hold'] / 2**20:,.0f} MiB must hold", f"{r['in_process_peak_vs_must_hold']:.2f}")
    for d in r["decode"]:
        t.add_row(f"decode tok/s batch {d['batch']} (cluster)", f"{d['cluster_decode_tokens_per_s']:.2f}",
                  f"{d['in_process_decode_tokens_per_s']:.2f} in process", f"{d['cluster_vs_in_process']:.2f}")
    t.add_row("logits cluster vs in-process", f"{r['logits_max_rel_diff']:.2e}", "max rel", "")
    con.print(t)


def main() -> None:
    p = make_parser("real_width", __doc__)
    p.add_argument("--config", type=Path, default=SLICE)
    p.add_argument("--checkpoint", type=Path, default=None, help="an existing checkpoint of the config's model")
    p.add_argument("--layers", type=int, default=None, help="model.num_layers (default: the config's)")
    p.add_argument("--experts", type=int, default=None, help="model.num_experts (default: the config's)")
    p.add_argument("--tokens", type=int, default=512, help="prefill length")
    p.add_argument("--reps", type=int, default=None,
                   help="timed prefills (and generations) per variant (default 3; --quick 2)")
    p.add_argument("--decode-batches", type=int_list, default=[1, 4], help="decode batch sizes, e.g. 1,4,16")
    p.add_argument("--decode-tokens", type=int, default=8, help="new tokens per decode run")
    args = p.parse_args()
    emit(run(args), args.out)


if __name__ == "__main__":
    main()
