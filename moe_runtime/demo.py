"""`make demo`: start the local cluster from a config, run a forward pass and training steps with progress,
print the status table, write loss and expert-load PNGs under runs/demo, shut down."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from moe_runtime.config import load_config
from moe_runtime.inference import encode_text, next_token_predictions
from moe_runtime.model.accounting import count_params
from moe_runtime.plots import plot_load, plot_training

console = Console()
PROMPT = "def __init__(self"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="cluster/local.yaml")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default="runs/demo")
    args = ap.parse_args()
    cfg = load_config(args.config)
    steps = args.steps or cfg.train.steps
    counts = count_params(cfg.model)
    c = cfg.cluster
    console.print(f"[bold]moe-runtime demo[/bold]: {cfg.model.preset} model, {cfg.model.router} router, "
                  f"{cfg.model.num_experts} experts top-{cfg.model.top_k}, {counts.total_params:,} params "
                  f"({counts.active_params:,} active); {c.expert_actors} expert actors on {c.num_gpus} GPUs "
                  f"({c.num_nodes} node(s)), {c.router_workers} router workers")
    from moe_runtime.cli import _print_status
    from moe_runtime.runtime.cluster import Cluster

    t0 = time.perf_counter()
    with console.status("starting the cluster..."):
        cluster = Cluster.start(cfg)
    console.print(f"cluster up in {time.perf_counter() - t0:.1f} s")
    with cluster:
        preds = next_token_predictions(cluster.forward(encode_text(PROMPT, cfg.model.max_seq_len)), 3)
        console.print(f"forward before training, next byte after {PROMPT!r}: "
                      + ", ".join(f"{p.text!r} {p.prob:.2f}" for p in preds))
        with Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("train", total=steps, info="")
            result = cluster.train(
                steps, progress=lambda s, loss: bar.update(task, completed=s + 1, info=f"loss {loss:.3f}"))
        preds = next_token_predictions(cluster.forward(encode_text(PROMPT, cfg.model.max_seq_len)), 3)
        console.print("forward after training: " + ", ".join(f"{p.text!r} {p.prob:.2f}" for p in preds))
        status = cluster.status()
        _print_status(status)
        decision = result.extra.get("last_decision")
        if decision:
            console.print(f"scheduler: {decision}")
    out = Path(args.out)
    png = plot_training(result.losses, result.expert_load, out / "training.png",
                        title=f"{cfg.model.preset} / {cfg.model.router} router on the local cluster",
                        val_loss=result.val_loss)
    actor_load = [[v] for v in result.extra.get("actor_load", [])]
    load_png = plot_load(result.expert_load, list(map(list, zip(*actor_load))) or [[0]], out / "load.png",
                         title="token copies per expert and per actor")
    timings = result.extra.get("mean_timings", {})
    console.print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} (val {result.val_loss:.3f}), "
                  f"{result.tokens_per_s:,.0f} tokens/s, step {timings.get('step_s', 0) * 1e3:.0f} ms; "
                  f"total {time.perf_counter() - t0:.0f} s; wrote {png} and {load_png}")


if __name__ == "__main__":
    main()
