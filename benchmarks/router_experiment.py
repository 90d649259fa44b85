"""The Attention Router against the classical (linear) router, and grouped / top-p routing, trained through the
distributed runtime on the stdlib corpus, several seeds each.

Yuan 2.0-M32's central claim is that its Attention Router beats the classical router (paper: 2.109 vs 2.117 test
loss, 0.38%). This runs both on the same model otherwise, with the same data order per seed, and asks whether the
difference of the mean validation losses exceeds the spread over seeds.

Equal parameters and FLOPs: the two models are identical except the router itself, the thing under test. The
attention router holds 3*E*d parameters per layer (Wq, Wk, Wv) against the linear router's E*d, and adds 4*E^2
mixing FLOPs per token; nothing else can absorb that difference at the same granularity (one more FFN unit is
L*E*3*d parameters), so it is reported rather than hidden: `params` and `training_flops_per_token` of each variant
are in the JSON and the table (tiny preset: +0.44% parameters, +1.2% training FLOPs for the attention router).

Variants (tiny preset, cluster/local.yaml's layout: 4 expert actors, 2 router workers, scheduler off so the
placement is the same everywhere; one set of party processes for the whole run, re-initialised for every run by
Cluster.restart: each run starts from its config's initial weights at step 0, as a new cluster would):
- attention / topk (the baseline of the ratios), linear / topk;
- attention / grouped (G = 2 groups of 4 experts, top-1 in each: 2 experts per token);
- attention / top_p (p = 0.4, k_max = 4, dynamic entropy loss 1e-4: the "Harder Tasks" paper's p and beta).
Per variant: validation loss (mean, sample std over seeds), actor load balance (max / mean token copies per actor
over the run), the balance of the 2 expert groups (sum over layers of max / mean copies per group: 1 for grouped
by construction), tokens/s, mean experts per token. Ratios are against attention / topk in the same process.

`--quick`: 2 seeds x 4 steps of attention and linear (CI-sized; says nothing about quality). The full run: 3 seeds x
`--steps` (default 150) of all four variants. Writes runs/bench/router_experiment.json (+ .png with --plot).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._cluster_reuse import ClusterReuse  # noqa: E402
from benchmarks._common import emit, make_parser, stderr_console  # noqa: E402
from moe_runtime.config import RuntimeConfig, load_config  # noqa: E402

VARIANTS: dict[str, dict] = {
    "attention/topk": {"router": "attention"},
    "linear/topk": {"router": "linear"},
    "attention/grouped": {"router": "attention", "routing": "grouped", "routing_groups": 2},
    "attention/top_p": {"router": "attention", "routing": "top_p", "top_p": 0.4, "k_max": 4,
                        "dynamic_loss_coeff": 1e-4},
}
BASELINE = "attention/topk"


def variant_config(model: dict, seed: int, steps: int, max_files: int | None) -> RuntimeConfig:
    d = load_config(ROOT / "cluster" / "local.yaml").model_dump(mode="json")
    d["model"] = {"preset": "tiny", **model}
    d["train"].update({"steps": steps, "seed": seed, "warmup_steps": min(5, steps), "checkpoint_every": 0,
                       "val_batches": 8})
    d["data"]["max_files"] = max_files
    d["scheduler"]["enabled"] = False
    return RuntimeConfig.model_validate(d)


def training_flops(m, seq_len: int, experts_per_token: float) -> float:
    """Training FLOPs per token at the measured experts per token (linear in k; top_p's k varies per token)."""
    from moe_runtime.model.accounting import flops_per_token

    at = {k: flops_per_token(m.model_copy(update={"top_k": k}), seq_len)["training_flops_per_token"]
          for k in (1, 2)}
    return at[1] + (experts_per_token - 1) * (at[2] - at[1])


def run_one(cfg: RuntimeConfig, reuse: ClusterReuse) -> dict:
    """One training run on a fresh cluster state for `cfg`: the run's processes re-initialised (Cluster.restart),
    so every run, the first too, starts from the same footing (warm processes, step 0, cfg's initial weights)."""
    from moe_runtime.model.accounting import count_params

    t0 = time.perf_counter()
    c = reuse.start(cfg)
    r = c.train(cfg.train.steps)
    m, t = cfg.model, cfg.train
    tokens = t.steps * t.batch_size * t.seq_len
    actor = r.extra["actor_load"]
    halves = [[sum(row[:len(row) // 2]), sum(row[len(row) // 2:])] for row in r.expert_load]  # 2 expert groups
    experts_per_token = sum(map(sum, r.expert_load)) / m.num_layers / tokens
    return {
        "val_loss": r.val_loss,
        "final_train_loss": r.losses[-1],
        "tokens_per_s": r.tokens_per_s,
        "actor_load_max_over_mean": max(actor) / (sum(actor) / len(actor)),
        # the grouped variant's 2 expert groups (experts 0-3 on actors 0-1, 4-7 on 2-3): sum_l max / sum_l mean
        "group_load_max_over_mean": sum(map(max, halves)) / (sum(map(sum, halves)) / 2),
        "experts_per_token": experts_per_token,
        "params": count_params(m).total_params,
        "training_flops_per_token": training_flops(m, t.seq_len, experts_per_token),
        "wall_s": time.perf_counter() - t0,
    }


def summarise(runs: list[dict]) -> dict:
    vals = [r["val_loss"] for r in runs]
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    avg = {k: statistics.fmean(r[k] for r in runs) for k in
           ("tokens_per_s", "actor_load_max_over_mean", "group_load_max_over_mean", "experts_per_token",
            "final_train_loss")}
    return {"val_loss_mean": mean, "val_loss_std": std, "val_loss_min": min(vals), "val_loss_max": max(vals),
            "val_losses": vals, **avg, "params": runs[0]["params"],
            "training_flops_per_token": statistics.fmean(r["training_flops_per_token"] for r in runs)}


def compare(a: dict, b: dict, n_a: int, n_b: int) -> dict:
    """a - b in mean val loss, against the seed spread: the larger std and 2 standard errors of the difference."""
    diff = a["val_loss_mean"] - b["val_loss_mean"]
    se = math.sqrt(a["val_loss_std"] ** 2 / n_a + b["val_loss_std"] ** 2 / n_b)
    spread = max(a["val_loss_std"], b["val_loss_std"])
    return {"diff": diff, "relative": diff / b["val_loss_mean"], "seed_std_max": spread, "two_se": 2 * se,
            "exceeds_seed_std": abs(diff) > spread, "exceeds_two_se": abs(diff) > 2 * se}


def main() -> None:
    p = make_parser("router_experiment", __doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3; --quick 2)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 150; --quick 4)")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--max-files", type=int, default=None, help="cap the corpus (default all; --quick 40)")
    p.add_argument("--plot", action="store_true", help="also write a PNG of the val losses per seed")
    args = p.parse_args()
    console = stderr_console()
    seeds = args.seeds or (2 if args.quick else 3)
    steps = args.steps or (4 if args.quick else 150)
    max_files = args.max_files or (40 if args.quick else None)
    names = (args.variants.split(",") if args.variants else
             (["attention/topk", "linear/topk"] if args.quick else list(VARIANTS)))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}: expected a subset of {list(VARIANTS)}")

    from moe_runtime.runtime.ray_env import start_ray

    t_start = time.perf_counter()
    base = variant_config(VARIANTS[names[0]], 0, steps, max_files)
    env = start_ray(base.cluster, log_to_driver=False)  # one Ray for every run
    runs: dict[str, list[dict]] = {n: [] for n in names}
    reuse = ClusterReuse()  # one set of processes for every run (same layout), re-initialised per run
    try:
        reuse.start(base)
        for seed in range(seeds):  # seeds outermost: machine drift spreads over the variants alike
            for name in names:
                r = run_one(variant_config(VARIANTS[name], seed, steps, max_files), reuse)
                runs[name].append({"seed": seed, **r})
                console.print(f"{name:18s} seed {seed}: val {r['val_loss']:.4f}, {r['tokens_per_s']:,.0f} tok/s, "
                              f"{r['experts_per_token']:.2f} experts/token, {r['wall_s']:.0f} s")
    finally:
        reuse.close()
        env.shutdown()
    wall = time.perf_counter() - t_start

    summary = {n: summarise(rs) for n, rs in runs.items()}
    ref = summary.get(BASELINE, summary[names[0]])
    for s in summary.values():
        s["val_loss_vs_baseline"] = s["val_loss_mean"] / ref["val_loss_mean"]
        s["tokens_per_s_vs_baseline"] = s["tokens_per_s"] / ref["tokens_per_s"]
        s["params_vs_baseline"] = s["params"] / ref["params"]
        s["flops_vs_baseline"] = s["training_flops_per_token"] / ref["training_flops_per_token"]
    verdict = None
    if "attention/topk" in summary and "linear/topk" in summary:
        verdict = compare(summary["attention/topk"], summary["linear/topk"], seeds, seeds)

    from rich.table import Table

    table = Table(title=f"router experiment: tiny preset, {seeds} seeds x {steps} steps, local cluster "
                        f"({wall:.0f} s)")
    for col in ("variant", "val loss mean", "std", "vs base", "actor max/mean", "group max/mean", "tokens/s",
                "experts/token", "params", "train FLOPs/tok"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for n, s in summary.items():
        table.add_row(n, f"{s['val_loss_mean']:.4f}", f"{s['val_loss_std']:.4f}", f"{s['val_loss_vs_baseline']:.4f}",
                      f"{s['actor_load_max_over_mean']:.3f}", f"{s['group_load_max_over_mean']:.3f}",
                      f"{s['tokens_per_s']:,.0f}",
                      f"{s['experts_per_token']:.2f}", f"{s['params']:,}", f"{s['training_flops_per_token']:,.0f}")
    console.print(table)
    if verdict:
        console.print(f"attention - linear: {verdict['diff']:+.4f} ({verdict['relative']:+.2%}); seed std max "
                      f"{verdict['seed_std_max']:.4f}, 2 SE {verdict['two_se']:.4f}: "
                      f"{'exceeds' if verdict['exceeds_two_se'] else 'does not exceed'} the seed spread (2 SE)")
    result = {"benchmark": "router_experiment", "quick": args.quick, "seeds": seeds, "steps": steps,
              "max_files": max_files, "variants": {n: VARIANTS[n] for n in names}, "baseline": BASELINE,
              "wall_s": wall, "summary": summary, "runs": runs, "attention_vs_linear": verdict,
              "command": "python " + " ".join(["benchmarks/router_experiment.py", *sys.argv[1:]])}
    if args.plot:
        result["plot"] = str(_plot(runs, args.out.with_suffix(".png")))
    emit(result, args.out)


def _plot(runs: dict[str, list[dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, (name, rs) in enumerate(runs.items()):
        vals = [r["val_loss"] for r in rs]
        ax.scatter([i] * len(vals), vals, alpha=0.7)
        ax.errorbar([i + 0.15], [statistics.fmean(vals)], yerr=[statistics.stdev(vals) if len(vals) > 1 else 0],
                    fmt="o", color="black", capsize=4)
    ax.set_xticks(range(len(runs)), list(runs))
    ax.set_ylabel("validation loss")
    ax.set_title("val loss per seed (dots) and mean +- std (black)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
