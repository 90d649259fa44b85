"""One training step on the local Ray cluster against the in-process step, same model and batch, in one run.

Both run the same step function (training.py's decomposition: same chunks, global clip, AdamW), rounds
interleaved (in-process, cluster, in-process, ...) so machine drift hits both alike; the first round is a warm-up.

Baseline: InProcessTrainer.train_step at its *best* intra-op thread count (1 or all cores, the faster median). On a
2-core machine shared with other work, 2-thread torch can be 5-10x slower than 1 thread (threads spin against
each other); taking the better setting keeps the baseline honest rather than flattering the cluster.

Cluster: cluster/local.yaml's layout (4 expert actors with fake GPUs, 2 router workers, gloo grad sync), every
actor at cluster.torch_threads (1). Breakdown per step (medians; definitions in cluster.Cluster.train_step):
router_s (dense compute on the router workers), dispatch_s (data-plane wall time not spent computing experts:
encode, gRPC, decode, waiting), expert_s (expert compute on the actors per router worker), combine_s (plan build,
gather, combine), grad_sync_s (gloo all-reduce of the dense grads), optimizer_s (norms, clip and AdamW on all
parties, including the control-plane round trips).

Ratio: remote_vs_inprocess_step_time = cluster step / in-process step (goal <= 3.0), for local.yaml's tiny model.
overlap_vs_none_step_time: the `small` preset (batch 16 x 128) with transport.overlap two_batch vs none on one
cluster, switched between steps, the order alternating per round (run_overlap; median, min-max and a sign test
over the paired rounds: overlap_vs_none_spread, overlap_vs_none_within_noise). Overlap can only hide time where a
resource is idle, so the headline layout has as many busy processes as this machine has cores: 1 router worker +
1 expert actor, torch_threads 1 each (OVERLAP_LAYOUTS["one_per_core"]): one half's experts compute on the actor's
core while the worker runs the other half's attention and router on its own. The same comparison on
cluster/local.yaml's layout (2 router workers + 4 expert actors on 2 cores: every core already busy) is reported
as overlap_vs_none_step_time_local_yaml. Each mode's router-worker CPU, expert-handler CPU and
forward+backward wall are reported (CPU busy vs waiting), and overlap_limit_vs_none: the step if
forward+backward shrank to the busier party's CPU or to all parties' CPU over the cores (a rough physical limit
of overlap on this layout, on an otherwise idle machine).
The full run adds the `small` preset at batch 16 x 128 tokens, where compute dominates the fixed per-call costs.
Every cluster of the run (tiny, one_per_core, local_yaml; small in the full run) attaches to one local Ray; those
of local.yaml's layout (tiny, small, local_yaml) run on one set of party processes, re-initialised for each
(Cluster.restart: a fresh cluster's state and the config's initial weights), then one_per_core's start.
Writes runs/bench/step.json and prints it as the last stdout line.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._cluster_reuse import ClusterReuse  # noqa: E402
from benchmarks._common import emit, make_parser, ratio_spread, stderr_console  # noqa: E402
from moe_runtime.config import RuntimeConfig, load_config  # noqa: E402

BREAKDOWN = ("router_s", "dispatch_s", "expert_s", "combine_s", "grad_sync_s", "optimizer_s")
# overlap layouts: (router workers, expert actors, torch threads per party)
OVERLAP_LAYOUTS = {"one_per_core": (1, 1, 1), "local_yaml": (2, 4, 1)}
OVERLAP_KEYS = ("forward_backward_s", "worker_cpu_s", "worker_main_cpu_s", "expert_handler_cpu_s")


def bench_config(preset: str | None, batch: int | None, seq: int | None) -> RuntimeConfig:
    base = load_config(ROOT / "cluster" / "local.yaml")
    d = base.model_dump(mode="json")
    if preset is not None:
        d["model"] = {"preset": preset, "router": base.model.router}
    d["train"].update({k: v for k, v in (("batch_size", batch), ("seq_len", seq)) if v is not None})
    d["train"]["steps"] = 1000  # the lr schedule is irrelevant here; keep warm-up short and identical
    d["data"]["max_files"] = 200  # corpus load time is not what is measured
    return RuntimeConfig.model_validate(d)


def overlap_config(layout: str) -> RuntimeConfig:
    """The `small` preset at batch 16 x 128 on OVERLAP_LAYOUTS[layout] (fake GPUs: one per expert actor)."""
    workers, actors, threads = OVERLAP_LAYOUTS[layout]
    d = bench_config("small", 16, 128).model_dump(mode="json")
    d["cluster"].update({"router_workers": workers, "expert_actors": actors, "num_gpus": actors,
                         "torch_threads": threads})  # fmt: skip
    return RuntimeConfig.model_validate(d)


def one_ray():
    """One local Ray for every cluster of the run (each Cluster.start attaches to it and starts its own actors):
    a Ray start and stop per cluster is ~5 s of the quick run that measures nothing. It has the GPUs of the
    largest layout (cluster/local.yaml's 4 fake GPUs); a smaller one takes fewer."""
    from moe_runtime.runtime.ray_env import start_ray

    layouts = [bench_config(None, None, None)] + [overlap_config(name) for name in OVERLAP_LAYOUTS]
    widest = max(layouts, key=lambda c: c.cluster.num_gpus).cluster
    return start_ray(widest)


def run_case(name: str, cfg: RuntimeConfig, rounds: int, console, reuse: ClusterReuse) -> dict:
    from moe_runtime.training import InProcessTrainer

    threads = sorted({1, os.cpu_count() or 1})
    oracle = InProcessTrainer(cfg)
    inproc: dict[int, list[float]] = {n: [] for n in threads}
    remote: list[float] = []
    timings: list[dict] = []
    default_threads = torch.get_num_threads()
    cluster = reuse.start(cfg)
    for r in range(rounds + 1):
        for n in threads:
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            oracle.train_step(r)
            if r:
                inproc[n].append(time.perf_counter() - t0)
        torch.set_num_threads(default_threads)
        t0 = time.perf_counter()
        rep = cluster.train_step(r)
        if r:
            remote.append(time.perf_counter() - t0)
            timings.append(rep.timings.as_dict())
        console.print(f"[{name}] round {r}: cluster {remote[-1] if r else 0:.3f} s", highlight=False)
    med = {n: statistics.median(v) for n, v in inproc.items()}
    best = min(med, key=med.get)
    remote_s = statistics.median(remote)
    breakdown = {k: statistics.median(t[k] for t in timings) for k in BREAKDOWN}
    m = cfg.model
    return {
        "model": {"preset": m.preset, "hidden_size": m.hidden_size, "num_layers": m.num_layers,
                  "num_experts": m.num_experts, "top_k": m.top_k, "ffn_hidden_size": m.ffn_hidden_size},
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "expert_actors": cfg.cluster.expert_actors,
        "router_workers": cfg.cluster.router_workers,
        "rounds": rounds,
        "inprocess_step_s": med[best],
        "inprocess_threads": best,
        "inprocess_step_s_by_threads": {str(n): v for n, v in med.items()},
        "remote_step_s": remote_s,
        "remote_vs_inprocess_step_time": remote_s / med[best],
        "breakdown": breakdown,
        "breakdown_unattributed_s": max(0.0, remote_s - sum(breakdown.values())),
        "remote_step_s_all": remote,
    }


def run_overlap(cfg: RuntimeConfig, rounds: int, console, reuse: ClusterReuse, label: str = "overlap") -> dict:
    """transport.overlap two_batch vs none on ONE cluster, switched between steps (RouterWorker.set_overlap), the
    order alternating per round (none, tbo, tbo, none, ...) so drift hits both alike; round 0 is a warm-up of
    both. Ratio per round = two_batch step / none step (ratio_spread: median, [min, max], sign test), and where
    the time went per mode: the router workers' CPU (all workers, whole process and main thread) against their
    forward+backward wall, and the expert actors' handler CPU."""
    import ray

    steps: dict[str, list[float]] = {"none": [], "two_batch": []}
    parts: dict[str, list[dict]] = {"none": [], "two_batch": []}
    step = 0
    cluster = reuse.start(cfg)
    for r in range(rounds + 1):
        order = ("none", "two_batch") if r % 2 == 0 else ("two_batch", "none")
        this: dict[str, float] = {}
        for mode in order:
            ray.get([w.set_overlap.remote(mode) for w in cluster.workers], timeout=60)
            t0 = time.perf_counter()
            rep = cluster.train_step(step)
            this[mode] = time.perf_counter() - t0
            step += 1
            if r:
                steps[mode].append(this[mode])
                parts[mode].append(rep.timings.as_dict())
        console.print(f"[{label}] round {r}: none {this['none']:.3f} s, two_batch {this['two_batch']:.3f} s",
                      highlight=False)
    return summarize_overlap(cfg, steps, parts)


def summarize_overlap(cfg: RuntimeConfig, steps: dict[str, list[float]], parts: dict[str, list[dict]]) -> dict:
    """The overlap JSON of one layout from the paired step times and each step's StepTimings.as_dict()."""
    spread = ratio_spread(steps["two_batch"], steps["none"])

    def med(mode: str, key: str) -> float:
        return statistics.median(t[key] for t in parts[mode])

    by_mode = {mode: {k: med(mode, k) for k in OVERLAP_KEYS} | {
        # CPU busy vs waiting: worker CPU seconds (all workers) per second of forward+backward wall (x workers)
        "worker_cpu_per_wall": med(mode, "worker_cpu_s") / (med(mode, "forward_backward_s")
                                                             * cfg.cluster.router_workers),
        "step_s": statistics.median(steps[mode])} for mode in steps}  # fmt: skip
    none = by_mode["none"]
    # forward+backward can shrink at most to the busier party's CPU (a worker's main thread, or an actor's
    # handlers), and to all parties' CPU over the cores they share
    busiest = max(none["worker_main_cpu_s"] / cfg.cluster.router_workers,
                  none["expert_handler_cpu_s"] / cfg.cluster.expert_actors,
                  (none["worker_cpu_s"] + none["expert_handler_cpu_s"]) / (os.cpu_count() or 1))
    limit = (none["step_s"] - none["forward_backward_s"] + min(busiest, none["forward_backward_s"])) / none["step_s"]
    m = cfg.model
    return {
        "model": {"preset": m.preset, "hidden_size": m.hidden_size, "num_layers": m.num_layers,
                  "num_experts": m.num_experts},
        "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len, "rounds": spread["rounds"],
        "layout": {"router_workers": cfg.cluster.router_workers, "expert_actors": cfg.cluster.expert_actors,
                   "torch_threads": cfg.cluster.torch_threads, "micro_batches": cfg.train.micro_batches,
                   "cpus": os.cpu_count()},
        "none_step_s": statistics.median(steps["none"]),
        "two_batch_step_s": statistics.median(steps["two_batch"]),
        "overlap_vs_none_step_time": spread["median"],
        "overlap_vs_none_range": [spread["min"], spread["max"]],
        "overlap_vs_none_spread": spread,
        "overlap_vs_none_within_noise": spread["within_noise"],
        "overlap_limit_vs_none": limit,
        "by_mode": by_mode,
        "step_s_all": steps,
    }  # fmt: skip


def main() -> None:
    p = make_parser("step", __doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 5 quick, 8 full)")
    p.add_argument("--overlap-rounds", type=int, default=None,
                   help="paired overlap rounds on the one_per_core layout (default 8 quick, 16 full; local_yaml: half, 3 quick)")
    args = p.parse_args()
    console = stderr_console()
    rounds = args.rounds or (5 if args.quick else 8)
    t_start = time.perf_counter()
    result: dict = {"benchmark": "step", "quick": args.quick, "goal_remote_vs_inprocess": 3.0,
                    "loadavg_start": os.getloadavg()[0]}
    overlap_rounds = args.overlap_rounds or (8 if args.quick else 16)
    env = one_ray()
    reuse = ClusterReuse()  # local.yaml, small and local_yaml share a layout: one set of processes, re-initialised
    try:
        local = run_case("local.yaml", bench_config(None, None, None), rounds, console, reuse)
        if not args.quick:
            result["small"] = run_case("small", bench_config("small", 16, 128), max(3, rounds // 2), console, reuse)
        legacy_rounds = 3 if args.quick else max(3, overlap_rounds // 2)  # informational: 4 actors on 2 cores
        legacy = run_overlap(overlap_config("local_yaml"), legacy_rounds, console, reuse, "overlap local_yaml")
        overlap = run_overlap(overlap_config("one_per_core"), overlap_rounds, console, reuse, "overlap one_per_core")
    finally:
        reuse.close()
        env.shutdown()
    result.update({k: local[k] for k in ("remote_vs_inprocess_step_time", "inprocess_step_s", "remote_step_s",
                                         "inprocess_threads")})
    result.update(local["breakdown"])
    result["local"] = local
    result["overlap"] = overlap
    result["overlap_layout"] = "one_per_core: " + ", ".join(f"{k} {v}" for k, v in overlap["layout"].items())
    for key in ("overlap_vs_none_step_time", "overlap_vs_none_range", "overlap_vs_none_within_noise",
                "overlap_limit_vs_none"):
        result[key] = overlap[key]
    result["overlap_local_yaml"] = legacy
    result["overlap_vs_none_step_time_local_yaml"] = legacy["overlap_vs_none_step_time"]
    result["loadavg_end"] = os.getloadavg()[0]
    result["seconds"] = time.perf_counter() - t_start
    console.print(
        f"remote / in-process step time: {result['remote_vs_inprocess_step_time']:.2f} (goal <= 3.0); "
        + ", ".join(f"{k} {local['breakdown'][k] * 1e3:.1f} ms" for k in BREAKDOWN), highlight=False)
    for name, ov in (("one_per_core", overlap), ("local_yaml", legacy)):
        sp = ov["overlap_vs_none_spread"]
        console.print(f"two_batch / none step time ({name}): median {sp['median']:.3f} [{sp['min']:.3f}, "
                      f"{sp['max']:.3f}] over {sp['rounds']} rounds, sign test p {sp['sign_test_p']:.3f}"
                      + (" (within noise)" if sp["within_noise"] else "")
                      + f"; limit {ov['overlap_limit_vs_none']:.3f}", highlight=False)
    emit(result, args.out)


if __name__ == "__main__":
    main()
