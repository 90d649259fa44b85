"""`make demo`: start the local cluster from a config, run a forward pass and training steps with progress, a
short cached generation (tokens/s), print the status table, write loss and expert-load PNGs under runs/demo, shut down."""

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


GEN_PROMPTS = [PROMPT, "import ", "for i in ", "return "]
GEN_TOKENS = 40


def show_generation(cluster) -> None:
    """Cached generation on the cluster (caches on a router worker, experts on the actors): the prompts as one
    continuous batch, the first one streamed, decode tokens/s printed."""
    from moe_runtime.generation.sampling import SamplingParams

    marks: list[float] = []

    def on_event(e) -> None:
        marks.append(time.perf_counter())
        if e.request_id == "0" and e.text_delta:
            console.out(e.text_delta, end="", highlight=False)

    console.print(f"cached generation, {len(GEN_PROMPTS)} prompts x {GEN_TOKENS} tokens (greedy), "
                  f"streaming {PROMPT!r}: ", end="")
    t0 = time.perf_counter()
    done = cluster.generate(GEN_PROMPTS, SamplingParams(GEN_TOKENS, temperature=0), on_event)
    console.print()
    console.print(f"  as text: {done[0].text!r} ({done[0].finish_reason})", highlight=False)
    decode = sum(len(c.new_token_ids) - 1 for c in done)
    first = marks[len(GEN_PROMPTS) - 1]
    rate = decode / max(marks[-1] - first, 1e-9)
    console.print(f"generated {sum(len(c.new_token_ids) for c in done)} tokens: time to first token "
                  f"{(first - t0) * 1e3:.0f} ms, decode {rate:,.0f} tokens/s "
                  f"({rate / len(GEN_PROMPTS):,.0f} per sequence)")


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
        show_generation(cluster)
        status = cluster.status()
        _print_status(status)
        decision = result.extra.get("last_decision")
        if decision:
            console.print(f"scheduler: {decision}")
    out = Path(args.out)
    png = plot_training(result.losses, result.expert_load, out / "training.png",
                        title=f"{cfg.model.preset} / {cfg.model.router} router on the local cluster",
                        val_loss=result.val_loss)
    # what the actors really served, per layer (the status table's "tokens served" column sums these rows)
    load_png = plot_load(status["expert_load"], status["actor_load_per_layer"], out / "load.png",
                         title="token copies served per expert and per actor (training, eval and generation)")
    timings = result.extra.get("mean_timings", {})
    console.print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} (val {result.val_loss:.3f}), "
                  f"{result.tokens_per_s:,.0f} tokens/s, step {timings.get('step_s', 0) * 1e3:.0f} ms; "
                  f"total {time.perf_counter() - t0:.0f} s; wrote {png} and {load_png}")


if __name__ == "__main__":
    main()
