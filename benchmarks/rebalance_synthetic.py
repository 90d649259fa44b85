"""Rebalancing on synthetic Zipf load: our placement policy (scheduler/policy.py `decide`) vs DeepSeek EPLB.

    python benchmarks/rebalance_synthetic.py [--quick] [--json] [--gpus 8,16] [--zipf 1.0,1.2] [--noise 0.02]

The Yuan 2.0-M32 shape (32 experts, 24 layers); Zipf s = 1.0 and 1.2; 8, 16, 32, 64 GPUs (--quick: 8, 16),
8 GPUs per node; ceil(32 / GPUs) + 1 slots per GPU per layer, i.e. one redundant slot; 4096 tokens x top-2
per GPU per layer, drawn multinomially from Zipf probabilities whose hot experts differ per layer by a seeded
permutation. Two kinds of case:
- "cold": from the contiguous placement (expert e on GPU e * G // E, no replicas), ours = decide(...) vs
  EPLB (`eplb_placement`) on the same snapshot;
- "steady": a new snapshot = the old counts x max(0, 1 + noise x N(0, 1)) (noise 2% and 5%; --quick 2%),
  applied to the previous decision: ours = decide(new snapshot, our previous placement); EPLB re-run on
  the new snapshot, its bytes counted against its previous plan (EPLB reshuffles a large share of its slots
  under small noise while its balance barely moves; see docs/measurements.md).
EPLB's bytes are given twice: raw (its GPU numbering as it comes) and after `align_actors` (its GPUs
relabelled onto ours by a maximum-overlap assignment, EPLB issue #25's suggestion: the case most favourable
to EPLB, and the one the headline ratio uses). Bytes per expert copy: one Yuan 2.0-M32 expert's state
(`expert_state_bytes`).

Balancedness B = sum_l mean / sum_l max per-GPU token load (vLLM's; 1 = perfect). Timings are wall and CPU
seconds of one decide() / EPLB call: compare them within one run only.

Last stdout line (and runs/bench/rebalance_synthetic.json): balancedness_ours / balancedness_eplb (means
over the cases), bytes_moved_ours_vs_eplb (sum of our bytes / sum of aligned-EPLB bytes; goal <= 1), and the
per-case detail under "synthetic".
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from benchmarks._common import emit, float_list, int_list
from benchmarks._rebalance_common import (
    PARAMS,
    ScriptRun,
    copies_and_bytes,
    fmt,
    mean_or_none,
    policy_params_json,
    ratio,
    slots_for,
    timed,
    total_replicas,
)
from moe_runtime.config import ModelConfig
from moe_runtime.model.accounting import expert_state_bytes
from moe_runtime.placement import Placement, copies_between
from moe_runtime.scheduler.eplb import eplb_placement
from moe_runtime.scheduler.load import LoadSnapshot
from moe_runtime.scheduler.policy import (
    Capacities,
    PlacementDecision,
    PolicyParams,
    align_actors,
    decide,
)

NAME = "rebalance_synthetic"
YUAN = ModelConfig.from_preset("yuan-m32")
EXPERTS, LAYERS = YUAN.num_experts, YUAN.num_layers
YUAN_EXPERT_BYTES = expert_state_bytes(YUAN)
GPUS_PER_NODE = 8
TOKENS_PER_GPU, TOP_K = 4096, YUAN.top_k
HEADLINE_NOTE = (
    "balancedness_* = means over all synthetic cases (cold + steady); bytes ratio = sum of our copies / "
    "sum of EPLB's after align_actors over the synthetic cases (raw EPLB: bytes_moved_ours_vs_eplb_raw)"
)


def node_map(gpus: int, per_node: int = GPUS_PER_NODE) -> tuple[int, ...]:
    return tuple(a // per_node for a in range(gpus))


def zipf_tokens(rng: np.random.Generator, layers: int, experts: int, s: float, total: int) -> np.ndarray:
    """[L, E] token copies: per layer, `total` draws from Zipf(s) probabilities over permuted experts."""
    p = np.arange(1, experts + 1, dtype=np.float64) ** -s
    p /= p.sum()
    return np.stack([rng.multinomial(total, p[rng.permutation(experts)]) for _ in range(layers)]).astype(
        np.float64
    )


def add_noise(rng: np.random.Generator, tokens: np.ndarray, noise: float) -> np.ndarray:
    """Multiplicative noise: tokens x max(0, 1 + noise x N(0, 1)), per (layer, expert)."""
    return tokens * np.maximum(0.0, 1.0 + noise * rng.standard_normal(tokens.shape))


@dataclass(frozen=True)
class CasePlans:
    """One case: both sides' plans before and after deciding on `snapshot`, and what deciding cost."""

    kind: str  # "cold" or "steady"
    noise: float
    actor_nodes: tuple[int, ...]
    slots_per_gpu: int
    snapshot: LoadSnapshot
    prev_ours: Placement
    ours: PlacementDecision
    prev_eplb: Placement
    eplb: Placement
    prev_eplb_aligned: Placement
    eplb_aligned: Placement
    decide_wall_s: float
    decide_cpu_s: float
    eplb_wall_s: float
    eplb_cpu_s: float


def plan_case(
    s: float,
    gpus: int,
    layers: int,
    noises: Sequence[float],
    seed: int,
    experts: int = EXPERTS,
    bytes_per_expert: int = YUAN_EXPERT_BYTES,
    params: PolicyParams = PARAMS,
) -> list[CasePlans]:
    """The cold case, then one steady case per noise level (each from the cold plans), for one (s, GPUs)."""
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
    cases = [
        CasePlans("cold", 0.0, nodes, slots, snap, start, ours, start, eplb, start, eplb_al,
                  d_wall, d_cpu, e_wall, e_cpu)
    ]  # fmt: skip
    for noise in noises:
        new_tokens = add_noise(rng, tokens, noise)
        snap2 = LoadSnapshot(1, new_tokens)
        ours2, d_wall, d_cpu = timed(decide, snap2, ours.placement, caps, params)
        eplb2, e_wall, e_cpu = timed(eplb_placement, new_tokens, gpus, slots, nodes)
        eplb2_al = align_actors(eplb2, eplb_al)
        cases.append(
            CasePlans("steady", noise, nodes, slots, snap2, ours.placement, ours2, eplb, eplb2, eplb_al,
                      eplb2_al, d_wall, d_cpu, e_wall, e_cpu)
        )  # fmt: skip
    return cases


def case_row(c: CasePlans, zipf_s: float, bytes_per_expert: int) -> dict:
    """The JSON row of one case: each plan's balance on the case's snapshot, copies, bytes, churn, timings."""
    new = c.ours.placement
    c_ours = copies_between(c.prev_ours, new)
    c_raw, c_al = copies_between(c.prev_eplb, c.eplb), copies_between(c.prev_eplb_aligned, c.eplb_aligned)
    snap = c.snapshot
    return {
        "zipf_s": zipf_s,
        "gpus": new.num_actors,
        "nodes": len(set(c.actor_nodes)),
        "slots_per_gpu": c.slots_per_gpu,
        "layers": new.num_layers,
        "experts": new.num_experts,
        "kind": c.kind,
        "noise": c.noise,
        # balance of what each side had before this decision, on this snapshot
        "balancedness_before_ours": snap.balancedness(c.prev_ours),
        "balancedness_before_eplb": snap.balancedness(c.prev_eplb),
        "balancedness_ours": snap.balancedness(new),
        "balancedness_eplb": snap.balancedness(c.eplb),
        "ours_changed": c.ours.changed,
        **copies_and_bytes(c_ours, c_al, c_raw, bytes_per_expert),
        "bytes_ours_vs_eplb_aligned": ratio(c_ours, c_al),
        "bytes_ours_vs_eplb_raw": ratio(c_ours, c_raw),
        # share of the new plan's replicas that were not on that GPU before (EPLB's churn)
        "churn_ours": c_ours / total_replicas(new),
        "churn_eplb_aligned": c_al / total_replicas(c.eplb_aligned),
        "churn_eplb_raw": c_raw / total_replicas(c.eplb),
        "replicas_ours": total_replicas(new),
        "replicas_eplb": total_replicas(c.eplb),
        "decide_wall_s": c.decide_wall_s,
        "decide_cpu_s": c.decide_cpu_s,
        "eplb_wall_s": c.eplb_wall_s,
        "eplb_cpu_s": c.eplb_cpu_s,
    }


def summarize(rows: Sequence[dict]) -> dict:
    """Means of balancedness, bytes ratios over sums (sum ours / sum EPLB) for a set of case rows."""
    if not rows:
        return {}
    c_ours = sum(r["copies_ours"] for r in rows)
    c_al = sum(r["copies_eplb_aligned"] for r in rows)
    c_raw = sum(r["copies_eplb_raw"] for r in rows)
    return {
        "cases": len(rows),
        "balancedness_ours": mean_or_none([r["balancedness_ours"] for r in rows]),
        "balancedness_eplb": mean_or_none([r["balancedness_eplb"] for r in rows]),
        "balancedness_before": mean_or_none([r["balancedness_before_ours"] for r in rows]),
        "ours_at_least_as_balanced": sum(
            r["balancedness_ours"] >= r["balancedness_eplb"] - 1e-12 for r in rows
        ),
        "copies_ours": c_ours,
        "copies_eplb_aligned": c_al,
        "copies_eplb_raw": c_raw,
        "bytes_moved_ours_vs_eplb": ratio(c_ours, c_al),
        "bytes_moved_ours_vs_eplb_raw": ratio(c_ours, c_raw),
        "churn_ours": mean_or_none([r["churn_ours"] for r in rows]),
        "churn_eplb_aligned": mean_or_none([r["churn_eplb_aligned"] for r in rows]),
        "churn_eplb_raw": mean_or_none([r["churn_eplb_raw"] for r in rows]),
        "decide_wall_s_max": max(r["decide_wall_s"] for r in rows),
        "decide_cpu_s_mean": mean_or_none([r["decide_cpu_s"] for r in rows]),
        "eplb_cpu_s_mean": mean_or_none([r["eplb_cpu_s"] for r in rows]),
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
            new = [case_row(c, s, YUAN_EXPERT_BYTES) for c in plan_case(s, g, layers, noises, seed)]
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


def headline(synthetic: dict) -> dict:
    """Top-level ratios of a synthetic run (same fields in rebalance.json and rebalance_synthetic.json)."""
    summ = synthetic["summary"]
    return {
        "balancedness_ours": summ["balancedness_ours"],
        "balancedness_eplb": summ["balancedness_eplb"],
        "bytes_moved_ours_vs_eplb": summ["bytes_moved_ours_vs_eplb"],
        "bytes_moved_ours_vs_eplb_raw": summ["bytes_moved_ours_vs_eplb_raw"],
        "goal_bytes_moved_ours_vs_eplb": 1.0,
    }


def summary_line(result: dict) -> str:
    """The headline ratios in one line (printed by rebalance_synthetic.py and rebalance.py)."""
    return (
        f"B ours {fmt(result['balancedness_ours'])} vs EPLB {fmt(result['balancedness_eplb'])}, "
        f"bytes ours/EPLB {fmt(result['bytes_moved_ours_vs_eplb'])} "
        f"(raw {fmt(result['bytes_moved_ours_vs_eplb_raw'])})"
    )


def add_args(p) -> None:
    p.add_argument(
        "--gpus", type=int_list, default=None, help="synthetic GPU counts (default 8,16,32,64; quick 8,16)"
    )
    p.add_argument("--zipf", type=float_list, default=None, help="Zipf exponents (default 1.0,1.2)")
    p.add_argument(
        "--noise", type=float_list, default=None, help="steady-state noise levels (default 0.02,0.05)"
    )
    p.add_argument("--layers", type=int, default=LAYERS, help=f"synthetic layers (default {LAYERS})")


def run_from_args(args, progress=None) -> dict:
    gpus = args.gpus or ([8, 16] if args.quick else [8, 16, 32, 64])
    zipf_s = args.zipf or [1.0, 1.2]
    noises = args.noise or ([0.02] if args.quick else [0.02, 0.05])
    return run_synthetic(zipf_s, gpus, noises, args.layers, args.seed, progress)


def print_tables(console, syn: dict) -> None:
    from rich.table import Table

    t = Table(title="Synthetic Zipf load: ours vs EPLB (B = mean/max GPU load; copies = experts copied)")
    for col in ("kind", "s", "GPUs", "slots", "noise", "B before", "B ours", "B EPLB", "copies ours",
                "EPLB aligned", "EPLB raw", "churn EPLB raw", "decide s (cpu)"):  # fmt: skip
        t.add_column(col, justify="right")
    for r in syn["cases"]:
        t.add_row(
            r["kind"], f"{r['zipf_s']:g}", str(r["gpus"]), str(r["slots_per_gpu"]),
            f"{r['noise']:.0%}" if r["noise"] else "-", fmt(r["balancedness_before_ours"]),
            fmt(r["balancedness_ours"]), fmt(r["balancedness_eplb"]), str(r["copies_ours"]),
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
            fmt(m["balancedness_ours"]), fmt(m["balancedness_eplb"]),
            f"{m['ours_at_least_as_balanced']}/{m['cases']}", fmt(m["bytes_moved_ours_vs_eplb"]),
            fmt(m["bytes_moved_ours_vs_eplb_raw"]), fmt(m["churn_ours"], ".1%"),
            fmt(m["churn_eplb_raw"], ".1%"),
        )  # fmt: skip
    console.print(s)


def main(argv: list[str] | None = None) -> dict:
    run = ScriptRun.start(NAME, __doc__.split("\n\n")[0], [add_args], argv)
    synthetic = run_from_args(run.args, run.console.log)
    result = {
        "bench": NAME,
        **headline(synthetic),
        "headline_note": HEADLINE_NOTE,
        "policy_params": policy_params_json(),
        "quick": run.args.quick,
        "synthetic": synthetic,
        **run.clock(),
    }
    print_tables(run.console, synthetic)
    if not run.args.json:
        print(f"{NAME}: {summary_line(result)}")
    emit(result, run.args.out)
    return result


if __name__ == "__main__":
    main()
