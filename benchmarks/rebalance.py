"""Expert rebalancing: our placement policy (scheduler/policy.py `decide`) against DeepSeek EPLB, in one run.

    python benchmarks/rebalance.py [--quick] [--json] [--skip-cluster] [--skip-recorded]

1. Synthetic Zipf load (s = 1.0 and 1.2; 32 experts, 24 layers; 8, 16, 32, 64 GPUs, 8 GPUs per node;
   ceil(32 / GPUs) + 1 slots per GPU per layer, i.e. one redundant slot; 4096 tokens x top-2 per GPU per
   layer, drawn multinomially from Zipf probabilities whose hot experts differ per layer by a seeded
   permutation). Two kinds of case:
   - "cold": from the contiguous placement (expert e on GPU e * G // E, no replicas), ours = decide(...)
     vs EPLB (`eplb_placement`) on the same snapshot;
   - "steady": a new snapshot = the old counts x max(0, 1 + noise x N(0, 1)) (noise 2% and 5%), applied
     to the previous decision: ours = decide(new snapshot, our previous placement); EPLB re-run on the new
     snapshot, its bytes counted against its previous plan (anchors.md: EPLB churns ~73% of slots under
     2% noise while the balance barely moves).
   EPLB's bytes are given twice: raw (its GPU numbering as it comes) and after `align_actors` (its GPUs
   relabelled onto ours by a maximum-overlap assignment, EPLB issue #25's suggestion: the case most
   favourable to EPLB, and the one the headline ratio uses). Bytes per expert copy: a Yuan 2.0-M32 expert
   (3 x 2048 x 8192 parameters) in fp32 with AdamW m and v, 12 bytes per parameter (~604 MB).
2. Recorded: InProcessTrainer (the numerical oracle of the cluster: same routing) trains on the corpus
   (`small` preset, 4 layers x 16 experts, 30 steps; --quick: `tiny` with 16 experts, 10 steps); each step's
   expert_load [L, E] feeds a LoadTracker (EMA, decay 0.8). Every K steps (5; --quick 2) ours and EPLB
   re-plan from the EMA snapshot for 4 and 8 actors; each placement is scored on the loads of the steps
   that follow it (a plan is only ever judged on load it has not seen).
3. Cluster (skewed step time, static vs rebalanced, on the real 2-actor local cluster): not implemented
   here yet; it needs live migration (moe_runtime/scheduler/migrate.py), which does not exist yet. The
   JSON says so: "skewed_step_time_static_vs_rebalanced": null, "cluster_part": "not run".

Policy parameters: PolicyParams(min_gain=0.05, byte_budget=None, min_gain_per_copy=0.01), i.e. the
SchedulerConfig defaults without a byte budget (EPLB has none either). Balancedness B = sum_l mean / sum_l max
per-GPU token load (vLLM's; 1 = perfect). Timings are wall and CPU seconds of one decide() / EPLB call on a
shared 2-core machine: compare them within one run only.

Last stdout line (and runs/bench/rebalance.json): balancedness_ours / balancedness_eplb (means over the
synthetic cases), bytes_moved_ours_vs_eplb (sum of our bytes / sum of aligned-EPLB bytes over the synthetic
cases; goal <= 1), skewed_step_time_static_vs_rebalanced, and the per-case detail under "synthetic" and
"recorded".
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from benchmarks._common import emit, make_parser, stderr_console
from moe_runtime.runtime.placement import Placement
from moe_runtime.scheduler.eplb import eplb_placement
from moe_runtime.scheduler.load import LoadSnapshot, LoadTracker
from moe_runtime.scheduler.policy import (
    Capacities,
    PolicyParams,
    align_actors,
    bytes_moved,
    decide,
)

NAME = "rebalance"
EXPERTS, LAYERS, GPUS_PER_NODE = 32, 24, 8
TOKENS_PER_GPU, TOP_K, REDUNDANT = 4096, 2, 1
YUAN_HIDDEN, YUAN_FFN = 2048, 8192
BYTES_PER_PARAM = 12  # fp32 weight + AdamW exp_avg + exp_avg_sq
YUAN_EXPERT_BYTES = 3 * YUAN_HIDDEN * YUAN_FFN * BYTES_PER_PARAM
PARAMS = PolicyParams(min_gain=0.05, byte_budget=None, min_gain_per_copy=0.01)
GB = 1e9


# ----------------------------------------------------------------------------------------------- helpers


def slots_for(experts: int, gpus: int, redundant: int = REDUNDANT) -> int:
    return math.ceil(experts / gpus) + redundant


def node_map(gpus: int, per_node: int = GPUS_PER_NODE) -> tuple[int, ...]:
    return tuple(a // per_node for a in range(gpus))


def zipf_tokens(rng: np.random.Generator, layers: int, experts: int, s: float, total: int) -> np.ndarray:
    """[L, E] token copies: per layer, `total` draws from Zipf(s) probabilities over a permutation of experts."""
    p = np.arange(1, experts + 1, dtype=np.float64) ** -s
    p /= p.sum()
    return np.stack([rng.multinomial(total, p[rng.permutation(experts)]) for _ in range(layers)]).astype(
        np.float64
    )


def add_noise(rng: np.random.Generator, tokens: np.ndarray, noise: float) -> np.ndarray:
    """Multiplicative noise: tokens x max(0, 1 + noise x N(0, 1)), per (layer, expert)."""
    return tokens * np.maximum(0.0, 1.0 + noise * rng.standard_normal(tokens.shape))


def total_replicas(p: Placement) -> int:
    return sum(len(a) for row in p.replicas for a in row)


def copies(old: Placement, new: Placement) -> int:
    """(layer, expert, actor) replicas in `new` that `old` did not have: each is one expert copied."""
    return bytes_moved(old, new, 1)


def timed(fn, *args):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - w0, time.process_time() - c0


def ratio(a: float, b: float) -> float | None:
    if b > 0:
        return a / b
    return 1.0 if a == 0 else None  # 0 / 0: both moved nothing


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


# ----------------------------------------------------------------------------------------------- 1. synthetic


def synthetic_case(
    s: float,
    gpus: int,
    layers: int,
    noises: Sequence[float],
    seed: int,
    experts: int = EXPERTS,
    bytes_per_expert: int = YUAN_EXPERT_BYTES,
    params: PolicyParams = PARAMS,
) -> list[dict]:
    """The cold case and one steady case per noise level for one (s, GPU count). Returns one row per case."""
    rng = np.random.default_rng([seed, gpus, round(s * 1000)])
    nodes = node_map(gpus)
    slots = slots_for(experts, gpus)
    caps = Capacities(slots, bytes_per_expert, nodes)
    tokens = zipf_tokens(rng, layers, experts, s, gpus * TOKENS_PER_GPU * TOP_K)
    snap = LoadSnapshot(0, tokens)
    start = Placement.contiguous(layers, experts, gpus, nodes)

    ours, d_wall, d_cpu = timed(decide, snap, start, caps, params)
    eplb, e_wall, e_cpu = timed(eplb_placement, tokens, gpus, slots, nodes)
    eplb_al = align_actors(eplb, start)
    base = {"zipf_s": s, "gpus": gpus, "nodes": len(set(nodes)), "slots_per_gpu": slots, "layers": layers,
            "experts": experts}  # fmt: skip

    def row(kind, noise, snapshot, prev_ours, dec, prev_eplb, new_eplb, prev_al, new_al, times) -> dict:
        c_ours = copies(prev_ours, dec.placement)
        c_raw, c_al = copies(prev_eplb, new_eplb), copies(prev_al, new_al)
        return {
            **base,
            "kind": kind,
            "noise": noise,
            # balance of what each side had before this decision, on this snapshot
            "balancedness_before_ours": snapshot.balancedness(prev_ours),
            "balancedness_before_eplb": snapshot.balancedness(prev_eplb),
            "balancedness_ours": snapshot.balancedness(dec.placement),
            "balancedness_eplb": snapshot.balancedness(new_eplb),
            "ours_changed": dec.changed,
            "copies_ours": c_ours,
            "copies_eplb_aligned": c_al,
            "copies_eplb_raw": c_raw,
            "bytes_ours": c_ours * bytes_per_expert,
            "bytes_eplb_aligned": c_al * bytes_per_expert,
            "bytes_eplb_raw": c_raw * bytes_per_expert,
            "bytes_ours_vs_eplb_aligned": ratio(c_ours, c_al),
            "bytes_ours_vs_eplb_raw": ratio(c_ours, c_raw),
            # share of the new plan's replicas that were not on that GPU before (anchors.md's churn)
            "churn_ours": c_ours / total_replicas(dec.placement),
            "churn_eplb_aligned": c_al / total_replicas(new_al),
            "churn_eplb_raw": c_raw / total_replicas(new_eplb),
            "replicas_ours": total_replicas(dec.placement),
            "replicas_eplb": total_replicas(new_eplb),
            "decide_wall_s": times[0],
            "decide_cpu_s": times[1],
            "eplb_wall_s": times[2],
            "eplb_cpu_s": times[3],
        }

    rows = [row("cold", 0.0, snap, start, ours, start, eplb, start, eplb_al, (d_wall, d_cpu, e_wall, e_cpu))]
    for noise in noises:
        new_tokens = add_noise(rng, tokens, noise)
        snap2 = LoadSnapshot(1, new_tokens)
        ours2, d_wall, d_cpu = timed(decide, snap2, ours.placement, caps, params)
        eplb2, e_wall, e_cpu = timed(eplb_placement, new_tokens, gpus, slots, nodes)
        eplb2_al = align_actors(eplb2, eplb_al)
        rows.append(
            row("steady", noise, snap2, ours.placement, ours2, eplb, eplb2, eplb_al, eplb2_al,
                (d_wall, d_cpu, e_wall, e_cpu))
        )  # fmt: skip
    return rows


def summarize(rows: Sequence[dict]) -> dict:
    """Means of balancedness, bytes ratios over sums (sum ours / sum EPLB) for a set of case rows."""
    if not rows:
        return {}
    c_ours = sum(r["copies_ours"] for r in rows)
    c_al = sum(r["copies_eplb_aligned"] for r in rows)
    c_raw = sum(r["copies_eplb_raw"] for r in rows)
    return {
        "cases": len(rows),
        "balancedness_ours": _mean([r["balancedness_ours"] for r in rows]),
        "balancedness_eplb": _mean([r["balancedness_eplb"] for r in rows]),
        "balancedness_before": _mean([r["balancedness_before_ours"] for r in rows]),
        "ours_at_least_as_balanced": sum(
            r["balancedness_ours"] >= r["balancedness_eplb"] - 1e-12 for r in rows
        ),
        "copies_ours": c_ours,
        "copies_eplb_aligned": c_al,
        "copies_eplb_raw": c_raw,
        "bytes_moved_ours_vs_eplb": ratio(c_ours, c_al),
        "bytes_moved_ours_vs_eplb_raw": ratio(c_ours, c_raw),
        "churn_ours": _mean([r["churn_ours"] for r in rows]),
        "churn_eplb_aligned": _mean([r["churn_eplb_aligned"] for r in rows]),
        "churn_eplb_raw": _mean([r["churn_eplb_raw"] for r in rows]),
        "decide_wall_s_max": max(r["decide_wall_s"] for r in rows),
        "decide_cpu_s_mean": _mean([r["decide_cpu_s"] for r in rows]),
        "eplb_cpu_s_mean": _mean([r["eplb_cpu_s"] for r in rows]),
    }


def run_synthetic(
    zipf_s: Sequence[float],
    gpus: Sequence[int],
    noises: Sequence[float],
    layers: int = LAYERS,
    seed: int = 0,
    progress=None,
) -> dict:
    rows: list[dict] = []
    for s in zipf_s:
        for g in gpus:
            t0 = time.perf_counter()
            new = synthetic_case(s, g, layers, noises, seed)
            rows += new
            if progress:
                progress(f"synthetic s={s} GPUs={g}: {len(new)} cases in {time.perf_counter() - t0:.1f} s")
    return {
        "config": {
            "zipf_s": list(zipf_s), "gpus": list(gpus), "gpus_per_node": GPUS_PER_NODE, "layers": layers,
            "experts": EXPERTS, "tokens_per_gpu": TOKENS_PER_GPU, "top_k": TOP_K,
            "slots_per_gpu": "ceil(experts / gpus) + 1", "noise": list(noises),
            "noise_model": "tokens x max(0, 1 + noise x N(0,1))", "bytes_per_expert": YUAN_EXPERT_BYTES,
            "seed": seed,
        },
        "summary": summarize(rows),
        "summary_cold": summarize([r for r in rows if r["kind"] == "cold"]),
        "summary_steady": summarize([r for r in rows if r["kind"] == "steady"]),
        "cases": rows,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------- 2. recorded


def record_loads(preset: str, num_experts: int | None, steps: int, threads: int, progress=None) -> dict:
    """Train with InProcessTrainer on the corpus; return per-step expert_load [steps, L, E] and the model shape."""
    import torch

    from moe_runtime.config import ModelConfig, RuntimeConfig, TrainConfig
    from moe_runtime.training import InProcessTrainer

    torch.set_num_threads(threads)
    model = (
        ModelConfig(preset=preset)
        if num_experts is None
        else ModelConfig(preset=preset, num_experts=num_experts)
    )
    cfg = RuntimeConfig(model=model, train=TrainConfig(steps=steps))
    trainer = InProcessTrainer(cfg)
    loads, losses, times = [], [], []
    for step in range(steps):
        t0 = time.perf_counter()
        loss, _, load = trainer.train_step(step)
        times.append(time.perf_counter() - t0)
        loads.append(load.numpy().astype(np.float64))
        losses.append(loss)
    if progress:
        progress(f"recorded: {steps} steps of {preset} ({model.num_layers} layers x {model.num_experts} experts) "
                 f"in {sum(times):.1f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")  # fmt: skip
    m = cfg.model
    return {
        "loads": np.stack(loads),
        "losses": losses,
        "model": {"preset": preset, "layers": m.num_layers, "experts": m.num_experts, "top_k": m.top_k,
                  "hidden": m.hidden_size, "ffn": m.ffn_hidden_size, "router": m.router,
                  "aux_loss_coeff": m.aux_loss_coeff},
        "train": {"steps": steps, "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
                  "router_workers": cfg.cluster.router_workers, "step_s_mean": float(np.mean(times))},
        "bytes_per_expert": 3 * m.hidden_size * m.ffn_hidden_size * BYTES_PER_PARAM,
    }  # fmt: skip


def replay(loads: np.ndarray, actors: int, every: int, decay: float, bytes_per_expert: int) -> dict:
    """Replay recorded per-step loads: every `every` steps ours and EPLB re-plan from the EMA snapshot; each
    step is scored with the placements in force before it (decided on earlier steps only)."""
    steps, layers, experts = loads.shape
    nodes = (0,) * actors
    slots = slots_for(experts, actors)
    caps = Capacities(slots, bytes_per_expert, nodes)
    static = Placement.contiguous(layers, experts, actors, nodes)
    ours, eplb_raw, eplb_al = static, static, static
    tracker = LoadTracker(layers, experts, decay=decay)
    scored: dict[str, list[float]] = {"static": [], "ours": [], "eplb": []}
    c_ours = c_al = c_raw = 0
    decisions = changed = 0
    decide_wall: list[float] = []
    at_decision: dict[str, list[float]] = {"ours": [], "eplb": []}
    for t in range(steps):
        step_load = LoadSnapshot(t, loads[t])
        if decisions:  # score only steps after the first plan, so all three see the same steps
            scored["static"].append(step_load.balancedness(static))
            scored["ours"].append(step_load.balancedness(ours))
            scored["eplb"].append(step_load.balancedness(eplb_raw))
        tracker.update(t, loads[t])
        if (t + 1) % every or t == steps - 1:
            continue
        snap = tracker.snapshot()
        dec, wall, _ = timed(decide, snap, ours, caps, PARAMS)
        new_raw = eplb_placement(snap.tokens, actors, slots, nodes)
        new_al = align_actors(new_raw, eplb_al)
        c_ours += copies(ours, dec.placement)
        c_raw += copies(eplb_raw, new_raw)
        c_al += copies(eplb_al, new_al)
        decisions += 1
        changed += int(dec.changed)
        decide_wall.append(wall)
        ours, eplb_raw, eplb_al = dec.placement, new_raw, new_al
        at_decision["ours"].append(snap.balancedness(ours))
        at_decision["eplb"].append(snap.balancedness(eplb_raw))
    return {
        "actors": actors,
        "slots_per_actor": slots,
        "decisions": decisions,
        "ours_changed": changed,
        "scored_steps": len(scored["ours"]),
        "balancedness_static": _mean(scored["static"]),
        "balancedness_ours": _mean(scored["ours"]),
        "balancedness_eplb": _mean(scored["eplb"]),
        "balancedness_ours_on_snapshot": _mean(at_decision["ours"]),
        "balancedness_eplb_on_snapshot": _mean(at_decision["eplb"]),
        "copies_ours": c_ours,
        "copies_eplb_aligned": c_al,
        "copies_eplb_raw": c_raw,
        "bytes_ours": c_ours * bytes_per_expert,
        "bytes_eplb_aligned": c_al * bytes_per_expert,
        "bytes_eplb_raw": c_raw * bytes_per_expert,
        "bytes_moved_ours_vs_eplb": ratio(c_ours, c_al),
        "bytes_moved_ours_vs_eplb_raw": ratio(c_ours, c_raw),
        "decide_wall_s_mean": _mean(decide_wall),
    }


def run_recorded(
    preset: str,
    num_experts: int | None,
    steps: int,
    every: int,
    actors: Sequence[int],
    threads: int,
    decay: float = 0.8,
    load_log: Path | None = None,
    progress=None,
) -> dict:
    rec = record_loads(preset, num_experts, steps, threads, progress)
    loads = rec.pop("loads")
    if load_log is not None:  # the raw per-step loads, replayable with LoadTracker.load_jsonl
        tracker = LoadTracker(loads.shape[1], loads.shape[2], decay=decay)
        for t in range(loads.shape[0]):
            tracker.update(t, loads[t])
        load_log.parent.mkdir(parents=True, exist_ok=True)
        tracker.save_jsonl(load_log)
        rec["load_log"] = str(load_log)
    rec["every_steps"], rec["ema_decay"] = every, decay
    rec["per_actors"] = [replay(loads, a, every, decay, rec["bytes_per_expert"]) for a in actors]
    return rec


# ----------------------------------------------------------------------------------------------- 3. cluster

CLUSTER_NOT_RUN = (
    "not implemented: needs live migration (moe_runtime/scheduler/migrate.py does not exist yet); "
    "measure_cluster_skew() is to be added with it"
)


# ----------------------------------------------------------------------------------------------- output


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def print_tables(console, result: dict) -> None:
    from rich.table import Table

    syn = result.get("synthetic")
    if syn:
        t = Table(title="Synthetic Zipf load: ours vs EPLB (B = mean/max GPU load; copies = experts copied)")
        for col in ("kind", "s", "GPUs", "slots", "noise", "B before", "B ours", "B EPLB", "copies ours",
                    "EPLB aligned", "EPLB raw", "churn EPLB raw", "decide s (cpu)"):  # fmt: skip
            t.add_column(col, justify="right")
        for r in syn["cases"]:
            t.add_row(
                r["kind"], f"{r['zipf_s']:g}", str(r["gpus"]), str(r["slots_per_gpu"]),
                f"{r['noise']:.0%}" if r["noise"] else "-", _f(r["balancedness_before_ours"]),
                _f(r["balancedness_ours"]), _f(r["balancedness_eplb"]), str(r["copies_ours"]),
                str(r["copies_eplb_aligned"]), str(r["copies_eplb_raw"]), f"{r['churn_eplb_raw']:.0%}",
                f"{r['decide_wall_s']:.2f} ({r['decide_cpu_s']:.2f})",
            )  # fmt: skip
        console.print(t)
        s = Table(title="Synthetic summary (bytes ratio = sum ours / sum EPLB)")
        for col in ("cases", "n", "B ours", "B EPLB", "ours >= EPLB", "bytes vs EPLB aligned", "vs EPLB raw",
                    "churn ours", "churn EPLB raw"):  # fmt: skip
            s.add_column(col, justify="right")
        for name in ("summary_cold", "summary_steady", "summary"):
            m = syn[name]
            if not m:
                continue
            s.add_row(
                name.removeprefix("summary_") if name != "summary" else "all", str(m["cases"]),
                _f(m["balancedness_ours"]), _f(m["balancedness_eplb"]),
                f"{m['ours_at_least_as_balanced']}/{m['cases']}", _f(m["bytes_moved_ours_vs_eplb"]),
                _f(m["bytes_moved_ours_vs_eplb_raw"]), _f(m["churn_ours"], ".1%"), _f(m["churn_eplb_raw"], ".1%"),
            )  # fmt: skip
        console.print(s)
    rec = result.get("recorded")
    if rec:
        mdl = rec["model"]
        t = Table(
            title=f"Recorded load: {mdl['preset']} ({mdl['layers']} layers x {mdl['experts']} experts), "
            f"{rec['train']['steps']} steps, re-plan every {rec['every_steps']} (EMA {rec['ema_decay']}); "
            "B on the steps after each plan"
        )
        for col in ("actors", "slots", "plans (ours changed)", "B static", "B ours", "B EPLB", "copies ours",
                    "EPLB aligned", "EPLB raw"):  # fmt: skip
            t.add_column(col, justify="right")
        for r in rec["per_actors"]:
            t.add_row(
                str(r["actors"]), str(r["slots_per_actor"]), f"{r['decisions']} ({r['ours_changed']})",
                _f(r["balancedness_static"]), _f(r["balancedness_ours"]), _f(r["balancedness_eplb"]),
                str(r["copies_ours"]), str(r["copies_eplb_aligned"]), str(r["copies_eplb_raw"]),
            )  # fmt: skip
        console.print(t)
    console.print(
        f"balancedness ours {_f(result['balancedness_ours'])} vs EPLB {_f(result['balancedness_eplb'])}; "
        f"bytes moved ours / EPLB (aligned) = {_f(result['bytes_moved_ours_vs_eplb'])} (goal <= 1), "
        f"raw EPLB {_f(result['bytes_moved_ours_vs_eplb_raw'])}; cluster part: {result['cluster_part']}; "
        f"{result['seconds']:.1f} s"
    )


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict:
    p = make_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--skip-cluster", action="store_true", help="skip part 3 (real local cluster)")
    p.add_argument("--skip-recorded", action="store_true", help="skip part 2 (training run on the corpus)")
    p.add_argument(
        "--gpus", type=_ints, default=None, help="synthetic GPU counts (default 8,16,32,64; quick 8,16)"
    )
    p.add_argument("--zipf", type=_floats, default=None, help="Zipf exponents (default 1.0,1.2)")
    p.add_argument(
        "--noise", type=_floats, default=None, help="steady-state noise levels (default 0.02,0.05)"
    )
    p.add_argument("--layers", type=int, default=LAYERS, help=f"synthetic layers (default {LAYERS})")
    p.add_argument("--steps", type=int, default=None, help="training steps recorded (default 30; quick 10)")
    p.add_argument(
        "--every", type=int, default=None, help="re-plan every K recorded steps (default 5; quick 2)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads for the training run (default 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    console = stderr_console(width=None if sys.stderr.isatty() else 160)
    progress = console.log
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    gpus = args.gpus or ([8, 16] if args.quick else [8, 16, 32, 64])
    zipf_s = args.zipf or [1.0, 1.2]
    noises = args.noise or ([0.02] if args.quick else [0.02, 0.05])

    synthetic = run_synthetic(zipf_s, gpus, noises, args.layers, args.seed, progress)

    recorded = None
    if not args.skip_recorded:
        preset, experts = ("tiny", 16) if args.quick else ("small", None)
        steps = args.steps or (10 if args.quick else 30)
        every = args.every or (2 if args.quick else 5)
        log = args.out.with_name(args.out.stem + "_recorded_load.jsonl")
        recorded = run_recorded(
            preset, experts, steps, every, (4, 8), args.threads, load_log=log, progress=progress
        )

    cluster_reason = "skipped (--skip-cluster)" if args.skip_cluster else CLUSTER_NOT_RUN
    summ = synthetic["summary"]
    result = {
        "bench": NAME,
        "balancedness_ours": summ["balancedness_ours"],
        "balancedness_eplb": summ["balancedness_eplb"],
        "bytes_moved_ours_vs_eplb": summ["bytes_moved_ours_vs_eplb"],
        "bytes_moved_ours_vs_eplb_raw": summ["bytes_moved_ours_vs_eplb_raw"],
        "goal_bytes_moved_ours_vs_eplb": 1.0,
        "skewed_step_time_static_vs_rebalanced": None,
        "cluster_part": "not run",
        "cluster_part_reason": cluster_reason,
        "headline_note": (
            "balancedness_* = means over all synthetic cases (cold + steady); bytes ratio = sum of our copies / "
            "sum of EPLB's after align_actors over the synthetic cases (raw EPLB: bytes_moved_ours_vs_eplb_raw)"
        ),
        "policy_params": {"min_gain": PARAMS.min_gain, "byte_budget": PARAMS.byte_budget,
                          "min_gain_per_copy": PARAMS.min_gain_per_copy},
        "quick": args.quick,
        "synthetic": synthetic,
        "recorded": recorded,
        "loadavg_1m": [load0, os.getloadavg()[0]],
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    print_tables(console, result)
    if not args.json:
        print(
            f"rebalance: B ours {_f(result['balancedness_ours'])} vs EPLB {_f(result['balancedness_eplb'])}, "
            f"bytes ours/EPLB {_f(result['bytes_moved_ours_vs_eplb'])} (raw {_f(result['bytes_moved_ours_vs_eplb_raw'])})"
        )
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
