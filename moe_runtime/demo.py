"""`make demo`: train the configured model for about a minute, print a summary, write PNGs under runs/."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from moe_runtime.config import load_config
from moe_runtime.model.accounting import count_params
from moe_runtime.plots import plot_training
from moe_runtime.training import InProcessTrainer

console = Console()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="cluster/local.yaml")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default="runs/demo")
    args = ap.parse_args()
    cfg = load_config(args.config)
    steps = args.steps or cfg.train.steps
    counts = count_params(cfg.model)
    console.print(f"[bold]moe-runtime demo[/bold]: {cfg.model.preset} model, {cfg.model.router} router, "
                  f"{cfg.model.num_experts} experts top-{cfg.model.top_k}, "
                  f"{counts.total_params:,} params ({counts.active_params:,} active)")
    t0 = time.perf_counter()
    trainer = InProcessTrainer(cfg)
    info = trainer.corpus.describe()
    console.print(f"corpus: {info['num_files']} stdlib files, {info['num_bytes'] / 1e6:.1f} MB "
                  f"({info['train_tokens']:,} train / {info['val_tokens']:,} val tokens)")
    with Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.fields[info]}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("train", total=steps, info="")
        result = trainer.run(steps, progress=lambda s, loss: bar.update(task, completed=s + 1, info=f"loss {loss:.3f}"))
    out = Path(args.out)
    png = plot_training(result.losses, result.expert_load, out / "training.png",
                        title=f"{cfg.model.preset} / {cfg.model.router} router (in-process)", val_loss=result.val_loss)
    console.print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} (val {result.val_loss:.3f}), "
                  f"{result.tokens_per_s:,.0f} tokens/s, {time.perf_counter() - t0:.0f} s; wrote {png}")


if __name__ == "__main__":
    main()
