"""`make bench`: every benchmark (benchmarks/[!_]*.py) run in this one process, in turn, with one local Ray for all.

Each benchmark runs as `python benchmarks/<name>.py <args>` would (its own `main`, sys.argv set, its own
runs/bench/<name>.json and JSON line), but the Python start, `import torch` and the Ray start (~1.5 + ~3.5 s
here) are paid once instead of once a benchmark, and clusters of one layout started one after the other re-use
their processes (runtime/party_pool.py: Cluster.restart on a shut-down cluster's parties instead of a new party
start, ~1.6-2.5 CPU-s a party). What a benchmark measures is unchanged: its ratios are taken within its own run.

Between benchmarks the torch thread count, the environment and the working directory are put back. A benchmark
that raises or exits non-zero stops the suite with its exit status, as the shell loop did. Wall time per
benchmark goes to runs/bench/suite.json.

    python benchmarks/_suite.py --quick --json          # what `make bench` runs
    python benchmarks/_suite.py --quick --only step,transport
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import BENCH_DIR, write_result  # noqa: E402

SUITE_GPUS = 8  # fake GPUs of the one Ray: the widest benchmark layout (sim_accuracy's calibration) fits
# run order: a benchmark whose first cluster has the layout of the one before's last cluster re-uses its
# processes (expert actors; router workers may differ): rebalance_cluster (2 actors) -> sim_accuracy (2 ... 4)
# -> router_experiment (4) -> generate (4) -> step (4 ... 1); benchmarks not named here run last, in name order
ORDER = ("expert_compute", "gpu_check", "rebalance", "rebalance_recorded", "rebalance_synthetic", "transport",
         "faults", "real_width", "rebalance_cluster", "sim_accuracy", "router_experiment", "generate", "step")


def benchmark_names() -> list[str]:
    """What `make bench` runs: benchmarks/[!_]*.py, in ORDER, then any others in name order."""
    found = {p.stem for p in (ROOT / "benchmarks").glob("[!_]*.py")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def machine_busy() -> tuple[float, float] | None:
    """(busy, total) CPU jiffies of the whole machine so far (/proc/stat; None elsewhere): a benchmark's busy
    share says how much of its wall time was CPU work and how much waiting (timeouts, sleeps)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _busy_share(a: tuple[float, float] | None, b: tuple[float, float] | None) -> float | None:
    if a is None or b is None or b[1] <= a[1]:
        return None
    return round((b[0] - a[0]) / (b[1] - a[1]), 3)


def _run_one(name: str, args: list[str]) -> int:
    """Run benchmarks/<name>.py's main as its script would be run; its exit status."""
    mod = importlib.import_module(f"benchmarks.{name}")
    argv, cwd, environ = sys.argv, os.getcwd(), dict(os.environ)
    import torch

    threads = torch.get_num_threads()
    sys.argv = [str(ROOT / "benchmarks" / f"{name}.py"), *args]
    try:
        status = mod.main()
        return status if isinstance(status, int) else 0  # gpu_check returns its exit status, the others a result
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--json", action="store_true", help="pass --json to every benchmark")
    ap.add_argument("--only", default="", help="comma-separated benchmark names (default: all of them)")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "suite.json", help="wall times (default %(default)s)")
    args = ap.parse_args(argv)
    names = benchmark_names()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            ap.error(f"--only: no benchmark named {', '.join(unknown)} (benchmarks: {', '.join(names)})")
        names = [n for n in names if n in wanted]
    passed = [a for a in ("--quick", "--json") if getattr(args, a[2:])]

    from moe_runtime.config import ClusterConfig
    from moe_runtime.runtime import party_pool
    from moe_runtime.runtime.ray_env import start_ray

    t0 = time.perf_counter()
    env = start_ray(ClusterConfig(num_gpus=SUITE_GPUS, expert_actors=1), log_to_driver=False)
    ray_start_s = time.perf_counter() - t0
    walls: dict[str, float] = {}
    busy: dict[str, float | None] = {}  # share of the machine's CPU time busy (all processes) while each ran
    status = 0
    reuse: dict = {"starts": 0, "reuses": 0, "layouts": []}
    try:
        with party_pool.keep_parties() as pool:
            for name in names:
                t, cpu0 = time.perf_counter(), machine_busy()
                try:
                    status = _run_one(name, passed)
                except Exception:
                    traceback.print_exc()
                    status = 1
                walls[name] = round(time.perf_counter() - t, 2)
                busy[name] = _busy_share(cpu0, machine_busy())
                print(f"suite: {name} {'ok' if status == 0 else f'FAILED ({status})'} in {walls[name]:.1f} s"
                      + (f", machine CPU busy {busy[name]:.0%}" if busy[name] is not None else ""),
                      file=sys.stderr)  # fmt: skip
                if status:
                    break
                reuse = {"starts": pool.starts, "reuses": pool.reuses, "layouts": list(pool.layouts)}
    finally:
        env.shutdown()
    total = time.perf_counter() - t0
    result = {"bench": "suite", "quick": args.quick, "benchmarks": walls, "cpu_busy": busy, "total_s": round(total, 2),
              "ray_start_s": round(ray_start_s, 2), "clusters": reuse, "failed": None if status == 0 else names[len(walls) - 1]}
    write_result(result, args.out)
    print(f"suite: {len(walls)} benchmark(s) in {total:.1f} s; clusters started {reuse['starts']}, "
          f"re-used {reuse['reuses']}" + (f"; {result['failed']} FAILED" if status else ""), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
