"""One prepared check for a GPU machine: the `gpu` tests, expert compute, host-device copies, a cluster step.

    python benchmarks/gpu_check.py [--quick] [--json] [--dry-run] [--skip-tests] [--skip-cluster]

Without a CUDA device (or with --dry-run) it prints what it would run, says "no CUDA device" where there is none,
and exits 0 with a JSON line. On a GPU, in ONE process, each part against its baseline from the same run:

  tests     `pytest -m gpu tests/gpu` in a subprocess: passed / failed / skipped counts and the output tail
  compute   the experts of one MoE layer (32 SwiGLU experts, d and ffn of --preset, top-2 over N tokens with a
            mild skew, rows sorted by expert) as the expert shards run them (grouped_swiglu_forward_saving: one
            matmul pair per expert), as grouped_swiglu picks (padded bmm or loop) and, where torch has it, one
            torch._grouped_mm; baseline: ONE dense matmul pair of exactly the same FLOPs. Ratio = dense time /
            method time (1.0 = as fast as a dense GEMM), fp32 and bf16, several N; forward, CUDA-event timed
  copies    host -> device and device -> host, pageable vs pinned, and through HostStaging (the runtime's path:
            pinned staging buffer + one copy), at several sizes; GB/s against the link figure the device
            reports (nvidia-smi: PCIe generation x width, NVLink if listed)
  cluster   tests/gpu/gpu_cluster_step.py: a 2-actor local cluster (actors and router workers on the GPU) trained
            a few steps; its step time against the in-process CPU trainer's step in the same run, and the loss
            difference

Output: tables on stderr; the last stdout line is one JSON object, also written to runs/bench/gpu_check.json.
Absolute times mean something only on the GPU machine they were measured on.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import emit, make_parser
from moe_runtime.config import ModelConfig
from moe_runtime.model.device import HostStaging
from moe_runtime.model.experts import grouped_swiglu, grouped_swiglu_forward_saving, swiglu

NUM_EXPERTS, TOP_K = 32, 2
# PCIe payload GB/s per lane per generation (after line encoding), one direction
PCIE_LANE_GBS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


def plan(args) -> list[str]:
    sizes = _sizes(args)
    out = []
    if not args.skip_tests:
        out.append("pytest -m gpu tests/gpu (subprocess)")
    out.append(f"expert compute: {NUM_EXPERTS} experts, preset {args.preset}, tokens {sizes['tokens']}, fp32 + bf16: "
               "shards' loop / grouped_swiglu / torch._grouped_mm vs one dense matmul pair of the same FLOPs")
    out.append(f"copies: H2D and D2H, pageable / pinned / HostStaging, MB {sizes['copy_mb']} vs the reported link")
    if not args.skip_cluster:
        out.append(f"cluster: 2 expert actors + 2 router workers on the GPU, {sizes['steps']} steps vs in-process CPU")
    return out


def _sizes(args) -> dict[str, Any]:
    if args.quick:
        return {"tokens": [512, 8192], "copy_mb": [4, 64], "steps": 2, "reps": 10}
    return {"tokens": [256, 2048, 16384, 65536], "copy_mb": [1, 16, 256], "steps": 4, "reps": 30}


# ------------------------------------------------------------------------------------------------ device facts


def device_facts() -> dict[str, Any]:
    p = torch.cuda.get_device_properties(0)
    facts: dict[str, Any] = {"name": p.name, "total_memory_gib": p.total_memory / 2**30,
                             "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                             "torch": torch.__version__, "cuda": torch.version.cuda,
                             "device_count": torch.cuda.device_count()}  # fmt: skip
    facts.update(_link_figure())
    return facts


def _link_figure() -> dict[str, Any]:
    """The host link as nvidia-smi reports it: PCIe gen x width -> GB/s per direction; NVLink lines if any."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"link": None, "link_note": "nvidia-smi not found: no link figure"}
    q = "pcie.link.gen.current,pcie.link.width.current,pcie.link.gen.max,pcie.link.width.max"
    try:
        r = subprocess.run([smi, f"--query-gpu={q}", "--format=csv,noheader,nounits", "-i", "0"],
                           capture_output=True, text=True, timeout=20)  # fmt: skip
        gen, width, gen_max, width_max = (int(x) for x in r.stdout.strip().split(",")[:4])
    except (ValueError, subprocess.SubprocessError, OSError) as e:
        return {"link": None, "link_note": f"nvidia-smi pcie query failed: {e}"}
    out: dict[str, Any] = {
        "link": f"PCIe gen{gen} x{width} (max gen{gen_max} x{width_max})",
        "link_gbs": PCIE_LANE_GBS.get(gen, 0.0) * width,
        "link_max_gbs": PCIE_LANE_GBS.get(gen_max, 0.0) * width_max,
    }
    try:  # a link idles at a lower generation: the max is the figure a busy copy can reach
        r = subprocess.run([smi, "nvlink", "-s", "-i", "0"], capture_output=True, text=True, timeout=20)
        rates = [float(x) for x in re.findall(r"([\d.]+) GB/s", r.stdout)]
        if rates:
            out["nvlink_links"], out["nvlink_gbs"] = len(rates), sum(rates)
    except (subprocess.SubprocessError, OSError):
        pass
    return out


# ------------------------------------------------------------------------------------------------ timing


def _cuda_time(fn, reps: int) -> float:
    """Median seconds of fn() on the GPU (CUDA events), after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _wall_time(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------ compute


def _routed_counts(tokens: int, gen: torch.Generator) -> list[int]:
    popularity = torch.softmax(0.5 * torch.randn(NUM_EXPERTS, generator=gen), 0)
    ids = torch.multinomial(popularity.expand(tokens, -1), TOP_K, replacement=False, generator=gen)
    return torch.bincount(ids.flatten(), minlength=NUM_EXPERTS).tolist()


def bench_compute(preset: str, tokens_list: list[int], reps: int) -> list[dict[str, Any]]:
    m = ModelConfig(preset=preset)
    d, f = m.hidden_size, m.ffn_hidden_size
    rows_out = []
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        w1 = (torch.randn(NUM_EXPERTS, d, 2 * f, device="cuda") * 0.02).to(dtype)
        w2 = (torch.randn(NUM_EXPERTS, f, d, device="cuda") * 0.02).to(dtype)
        pairs = [(w1[e], w2[e]) for e in range(NUM_EXPERTS)]
        for tokens in tokens_list:
            counts = _routed_counts(tokens, gen)
            rows = sum(counts)
            x = torch.randn(rows, d, device="cuda", dtype=dtype)
            flops = 2 * rows * d * 2 * f + 2 * rows * f * d
            t = {"dense": _cuda_time(lambda: swiglu(x, w1[0], w2[0]), reps),
                 "shards_loop": _cuda_time(lambda: grouped_swiglu_forward_saving(x, counts, pairs), reps),
                 "grouped": _cuda_time(lambda: grouped_swiglu(x, counts, w1, w2), reps)}  # fmt: skip
            gmm = _grouped_mm_fn(x, counts, w1, w2)
            if gmm is not None:
                t["grouped_mm"] = _cuda_time(gmm, reps)
            row = {"dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "rows": rows, "d": d, "ffn": f,
                   "dense_tflops": flops / t["dense"] / 1e12}  # fmt: skip
            for k, v in t.items():
                row[f"{k}_ms"] = v * 1e3
                if k != "dense":
                    row[f"{k}_vs_dense"] = t["dense"] / v
            rows_out.append(row)
            print(f"  {row['dtype']:>8} N={tokens:>6} rows={rows:>7}: dense {t['dense'] * 1e3:8.3f} ms "
                  f"({row['dense_tflops']:6.1f} TFLOP/s); " + ", ".join(
                      f"{k} {row[f'{k}_vs_dense']:.2f}x" for k in t if k != "dense"), file=sys.stderr)
    return rows_out


def _grouped_mm_fn(x, counts, w1, w2):
    """torch._grouped_mm over the rows (bf16 only on most builds); None when this torch / GPU lacks it."""
    gmm = getattr(torch, "_grouped_mm", None)
    if gmm is None or x.dtype != torch.bfloat16:
        return None
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)

    def run():
        h = gmm(x, w1, offs=offs)
        a, g = h.chunk(2, dim=-1)
        return gmm((torch.nn.functional.silu(a) * g).contiguous(), w2, offs=offs)

    try:
        run()
        torch.cuda.synchronize()
    except (RuntimeError, TypeError, NotImplementedError) as e:
        print(f"  torch._grouped_mm unavailable here: {str(e).splitlines()[0][:120]}", file=sys.stderr)
        return None
    return run


# ------------------------------------------------------------------------------------------------ copies


def bench_copies(sizes_mb: list[int], reps: int, link_gbs: float | None) -> list[dict[str, Any]]:
    out = []
    staging = HostStaging("cuda")
    for mb in sizes_mb:
        n = (mb << 20) // 4
        pageable = torch.randn(n)
        pinned = torch.empty(n, pin_memory=True).copy_(pageable)
        dev = torch.empty(n, device="cuda")
        host_out = torch.empty(n, pin_memory=True)
        t = {
            "h2d_pageable": _cuda_time(lambda: dev.copy_(pageable), reps),
            "h2d_pinned": _cuda_time(lambda: dev.copy_(pinned, non_blocking=True), reps),
            "d2h_pageable": _cuda_time(lambda: pageable.copy_(dev), reps),
            "d2h_pinned": _cuda_time(lambda: host_out.copy_(dev, non_blocking=True), reps),
            # the runtime's paths, host work included (wall clock): a received frame to the device and back
            "staging_to_device": _wall_time(lambda: staging.to_device(pageable), reps),
            "staging_to_host": _wall_time(lambda: staging.to_host(dev), reps),
        }
        row: dict[str, Any] = {"mb": mb}
        for k, v in t.items():
            gbs = (n * 4) / v / 1e9
            row[f"{k}_gbs"] = gbs
            if link_gbs:
                row[f"{k}_vs_link"] = gbs / link_gbs
        out.append(row)
        print(f"  {mb:>5} MB: " + ", ".join(f"{k} {row[f'{k}_gbs']:.1f} GB/s" for k in t), file=sys.stderr)
    return out


# ------------------------------------------------------------------------------------------------ tests, cluster


def run_gpu_tests(timeout_s: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           "tests/gpu"], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
    tail = proc.stdout.strip().splitlines()[-40:]
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    for k in counts:
        m = re.search(rf"(\d+) {k}", tail[-1] if tail else "")
        counts[k] = int(m.group(1)) if m else 0
    print(f"  rc {proc.returncode}: {tail[-1] if tail else '(no output)'}", file=sys.stderr)
    return {"rc": proc.returncode, **counts, "wall_s": time.perf_counter() - t0, "tail": tail}


def run_cluster(steps: int, precision: str, timeout_s: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "tests.gpu.gpu_cluster_step", "--device", "cuda", "--steps",
                           str(steps), "--precision", precision], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s)  # fmt: skip
    if proc.returncode != 0:
        return {"rc": proc.returncode, "stderr_tail": proc.stderr[-3000:]}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    later = r["step_times_s"][1:] or r["step_times_s"]  # the first step includes warm-up (CUDA init, caches)
    r["cluster_step_s"] = statistics.median(later)
    r["vs_in_process_cpu"] = r["oracle_step_s"] / r["cluster_step_s"]
    r["max_loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], r["oracle_losses"]))
    print(f"  {precision}: step {r['cluster_step_s'] * 1e3:.1f} ms vs in-process CPU {r['oracle_step_s'] * 1e3:.1f} ms"
          f" ({r['vs_in_process_cpu']:.2f}x); devices actors {r['actor_devices']} workers {r['worker_devices']}; "
          f"max loss rel diff {r['max_loss_rel_diff']:.2e}", file=sys.stderr)
    return {"rc": 0, **r}


def main(argv: list[str] | None = None) -> int:
    p = make_parser("gpu_check", __doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="say what would run and exit 0")
    p.add_argument("--skip-tests", action="store_true", help="do not run the gpu tests")
    p.add_argument("--skip-cluster", action="store_true", help="do not run the cluster step")
    p.add_argument("--preset", default="yuan-m32", choices=["tiny", "small", "yuan-m32"],
                   help="expert sizes (d, ffn) for the compute part (default yuan-m32: d 2048, ffn 8192)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    would = plan(args)
    if args.dry_run or not cuda:
        msg = "dry run" if cuda else "no CUDA device"
        print(f"gpu_check: {msg}; on a GPU machine it runs:", file=sys.stderr)
        for line in would:
            print(f"  - {line}", file=sys.stderr)
        result = {"bench": "gpu_check", "cuda": cuda, "dry_run": args.dry_run, "message": msg, "would_run": would}
        # a dry run must not overwrite the results of a real GPU run
        emit(result, args.out.with_name(args.out.stem + "-dry.json") if args.out.name == "gpu_check.json" else args.out)
        return 0
    s = _sizes(args)
    result: dict[str, Any] = {"bench": "gpu_check", "cuda": True, "quick": args.quick}
    print("device:", file=sys.stderr)
    result["device"] = facts = device_facts()
    print(f"  {facts}", file=sys.stderr)
    if not args.skip_tests:
        print("gpu tests:", file=sys.stderr)
        result["tests"] = run_gpu_tests(900)
    print(f"expert compute (preset {args.preset}, ratio = dense time / method time):", file=sys.stderr)
    result["compute"] = bench_compute(args.preset, s["tokens"], s["reps"])
    link = facts.get("link_max_gbs") or None
    print(f"copies (link {facts.get('link')}, {link} GB/s per direction):", file=sys.stderr)
    result["copies"] = bench_copies(s["copy_mb"], s["reps"], link)
    if not args.skip_cluster:
        print("cluster step:", file=sys.stderr)
        result["cluster"] = {"fp32": run_cluster(s["steps"], "fp32", 600)}
        if not args.quick:
            result["cluster"]["bf16"] = run_cluster(s["steps"], "bf16", 600)
    emit(result, args.out)
    ok = result.get("tests", {}).get("rc", 0) == 0 and all(c.get("rc") == 0 for c in result.get("cluster", {}).values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
