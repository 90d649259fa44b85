"""`moe-runtime`: up | status | forward | train | down | simulate | flops.

Human output goes to stderr (rich); with --json the LAST stdout line is one JSON object, for scripts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from moe_runtime.config import ConfigError, RuntimeConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err = Console(stderr=True)

DEFAULT_CONFIG = Path("cluster/local.yaml")


def _load(config: Path, **overrides: dict) -> RuntimeConfig:
    try:
        cfg = load_config(config)
        if overrides:
            data = cfg.model_dump()
            for section, values in overrides.items():
                data[section].update({k: v for k, v in values.items() if v is not None})
            from moe_runtime.config import parse_config

            cfg = parse_config(data, source=f"{config} (with command-line overrides)")
        return cfg
    except ConfigError as e:
        err.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2) from None


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=err,
        disable=not err.is_terminal and False,
    )


def _emit_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------- flops


@app.command()
def flops(
    preset: str = typer.Option("yuan-m32", help="model preset: yuan-m32 | small | tiny"),
    config: Optional[Path] = typer.Option(None, help="take the model from a config file instead of a preset"),
    seq_len: Optional[int] = typer.Option(None, help="sequence length for attention-score FLOPs (default: max)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last stdout line"),
) -> None:
    """Parameter and FLOP counts (paper convention 2 x active params, plus the fuller count)."""
    from moe_runtime.config import ModelConfig
    from moe_runtime.model.accounting import flops_report, flops_table_rows

    try:
        model = load_config(config).model if config else ModelConfig(preset=preset)
    except (ConfigError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    report = flops_report(model, seq_len)
    table = Table(title=f"{model.preset or 'custom'} model: parameters and FLOPs")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for name, value in flops_table_rows(report):
        table.add_row(name, value)
    (err if as_json else Console()).print(table)
    if as_json:
        _emit_json(report)


# ----------------------------------------------------------------------------------------------- train


@app.command()
def train(
    config: Path = typer.Option(DEFAULT_CONFIG, help="runtime config (YAML)"),
    steps: Optional[int] = typer.Option(None, help="training steps (default: train.steps)"),
    router: Optional[str] = typer.Option(None, help="attention | linear (overrides model.router)"),
    seed: Optional[int] = typer.Option(None, help="seed for weights and data order (overrides train.seed)"),
    in_process: bool = typer.Option(False, "--in-process", help="train in this process (the numerical oracle)"),
    plot: Optional[Path] = typer.Option(None, help="write a PNG with the loss curve and expert load"),
    record_trace: Optional[Path] = typer.Option(None, help="write the run's routing trace (.npz or .jsonl) for "
                                                "`simulate --trace` (cluster runs)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last stdout line"),
) -> None:
    """Train the model: on the cluster (default) or in-process."""
    if record_trace is not None and in_process:
        raise typer.BadParameter("--record-trace records a cluster run's routing; drop --in-process",
                                 param_hint="--record-trace")
    if record_trace is not None and record_trace.suffix not in (".npz", ".jsonl"):
        raise typer.BadParameter(f"{str(record_trace)!r}: expected a path ending in .npz or .jsonl",
                                 param_hint="--record-trace")
    cfg = _load(config, model={"router": router}, train={"seed": seed, "steps": steps})
    n = cfg.train.steps
    with _progress() as bar:
        task = bar.add_task("train", total=n, info="")

        def on_step(step: int, loss: float) -> None:
            bar.update(task, completed=step + 1, info=f"loss {loss:.3f}")

        if in_process:
            from moe_runtime.training import InProcessTrainer

            result = InProcessTrainer(cfg).run(n, progress=on_step)
        else:
            from moe_runtime.runtime.session import run_on_cluster

            trace = str(record_trace.resolve()) if record_trace else None
            result = run_on_cluster(cfg, lambda cluster: cluster.train(n, progress=on_step, record_trace=trace))
    err.print(f"losses {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, val {result.val_loss:.3f}, "
              f"{result.tokens_per_s:,.0f} tokens/s")
    if result.extra.get("trace"):
        err.print(f"routing trace written to {result.extra['trace']} (replay: moe-runtime simulate --trace ...)")
    if plot:
        from moe_runtime.plots import plot_training

        plot_training(result.losses, result.expert_load, plot, title=f"{cfg.model.router} router",
                      val_loss=result.val_loss)
        err.print(f"wrote {plot}")
    if as_json:
        sys.stdout.write(result.to_json() + "\n")


# ----------------------------------------------------------------------------------------------- cluster life


@app.command()
def up(config: Path = typer.Option(DEFAULT_CONFIG, help="runtime config (YAML)")) -> None:
    """Start the cluster and leave it running (a daemon owns it; `down` stops it)."""
    from moe_runtime.runtime.session import SessionError, start_daemon

    _load(config)
    with err.status("starting the cluster (Ray, expert actors, router workers)..."):
        try:
            handle = start_daemon(config)
        except SessionError as e:
            err.print(f"[red]{e}[/red]")
            raise typer.Exit(1) from None
    _print_status(handle.status())
    err.print("cluster is up: `moe-runtime train`, `forward` and `status` use it; `moe-runtime down` stops it")


@app.command()
def down() -> None:
    """Stop the running cluster."""
    from moe_runtime.runtime.session import stop_daemon

    if stop_daemon():
        err.print("cluster stopped")
    else:
        err.print("no cluster is up")


@app.command()
def status(
    config: Path = typer.Option(DEFAULT_CONFIG, help="config to start a cluster with when none is up"),
    heatmap: Optional[Path] = typer.Option(None, help="write a PNG of load per layer x expert and per actor"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last stdout line"),
) -> None:
    """Placement, nodes, per-actor load and health of the running cluster."""
    from moe_runtime.runtime.session import running

    handle = running()
    if handle is None:
        err.print("[yellow]no cluster is up[/yellow] (`moe-runtime up --config C` starts one)")
        raise typer.Exit(1)
    st = handle.status()
    _print_status(st)
    if heatmap:
        from moe_runtime.plots import plot_load

        load = st.get("expert_load") or [[0] * len(st["placement"]["replicas"][0])] * len(st["placement"]["replicas"])
        plot_load(load, st.get("actor_load_per_layer") or [[a.get("tokens", 0) for a in st["expert_actors"]]],
                  heatmap, title=f"step {st['step']}, placement v{st['placement']['version']}")
        err.print(f"wrote {heatmap}")
    if as_json:
        _emit_json(st)


def _print_status(st: dict) -> None:
    table = Table(title=f"moe-runtime cluster: step {st['step']}, placement v{st['placement']['version']}, "
                        f"{len(st['nodes'])} node(s), {'healthy' if st['healthy'] else 'UNHEALTHY'}")
    for col in ("actor", "node", "address", "device", "shards", "tokens served", "health"):
        table.add_column(col)
    node_names = {n: f"node{i}" for i, n in enumerate(st["nodes"])}
    for a in st["expert_actors"]:
        table.add_row(str(a.get("index")), node_names.get(a.get("node_id"), str(a.get("node_id", "?"))[:8]),
                      str(a.get("address", "-")), str(a.get("device", "-")), str(len(a.get("shards", []))),
                      f"{a.get('tokens', 0):,}", a["health"])
    for w in st["router_workers"]:
        table.add_row(f"worker {w.get('index')}", node_names.get(w.get("node_id"), "?"), "-",
                      str(w.get("device", "-")), "dense", "-", w["health"])
    err.print(table)
    sched = st.get("scheduler")
    if sched and sched.get("imbalance") is not None:
        err.print(f"imbalance (max/mean tokens per actor): {sched['imbalance']:.3f}; rebalances: "
                  f"{sched.get('rebalances', 0)}; last decision: {sched.get('last_decision') or 'none'}")
        if sched.get("predicted_gain") is not None:
            measured = sched.get("measured_gain")
            err.print(f"  predicted gain {sched['predicted_gain']:+.1%}, measured "
                      + (f"{measured:+.1%}" if measured is not None else "(pending)"))


@app.command()
def forward(
    text: str = typer.Option(..., help="prompt text (bytes are the tokens)"),
    config: Path = typer.Option(DEFAULT_CONFIG, help="runtime config (YAML)"),
    top: int = typer.Option(5, help="how many next-token candidates to show"),
    generate: int = typer.Option(0, help="also continue the text greedily by this many bytes"),
    in_process: bool = typer.Option(False, "--in-process", help="use an in-process model (untrained unless a "
                                                                  "checkpoint is restored on the cluster)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last stdout line"),
) -> None:
    """Run a forward pass and print next-token predictions."""
    from moe_runtime.inference import encode_text, greedy_continuation, next_token_predictions

    cfg = _load(config)
    try:
        tokens = encode_text(text, cfg.model.max_seq_len)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None

    def run(model_forward) -> dict:
        preds = next_token_predictions(model_forward(tokens), top)
        cont = greedy_continuation(model_forward, tokens, generate, cfg.model.max_seq_len) if generate else ""
        return {"predictions": [p.__dict__ for p in preds], "continuation": cont}

    if in_process:
        from moe_runtime.model.transformer import build_model

        model = build_model(cfg.model, cfg.train.seed).eval()
        result = run(lambda t: model(t).logits.detach())
    else:
        from moe_runtime.runtime.session import run_on_cluster

        result = run_on_cluster(cfg, lambda c: run(c.forward))
    table = Table(title=f"next token after {text[-40:]!r}")
    table.add_column("token")
    table.add_column("probability", justify="right")
    for p in result["predictions"]:
        table.add_row(p["text"], f"{p['prob']:.3f}")
    err.print(table)
    if generate:
        err.print(f"greedy continuation: {result['continuation']!r}")
    if as_json:
        _emit_json(result)


@app.command()
def simulate(
    config: Path = typer.Option(Path("cluster/sim-64gpu.yaml"), help="config with a sim section"),
    trace: Optional[str] = typer.Option(None, help="routing trace file to replay, or uniform | zipf | drift"),
    steps: Optional[int] = typer.Option(None, help="steps of the trace to simulate"),
    what_if: Optional[str] = typer.Option(None, "--what-if", help="rebalance: static vs the scheduler's placement"),
    plot: Optional[Path] = typer.Option(None, help="PNG: per-GPU timeline and step time vs cluster size"),
    calibrate: bool = typer.Option(False, "--calibrate", help="profile this machine and write its cost table"),
    against_cluster: bool = typer.Option(False, "--against-cluster", help="with --calibrate: also run the config's "
                                         "local cluster a few steps and scale the table to its measured CPU"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last stdout line"),
) -> None:
    """Predict step time for a cluster far larger than this machine."""
    from moe_runtime.sim.cli_impl import simulate_command

    _load(config)
    cluster_calibration = None
    if against_cluster:  # the live cluster is runtime's: sim/ gets the measurement passed in
        from moe_runtime.runtime.calibrate_cluster import against_cluster as cluster_calibration_of

        cluster_calibration = cluster_calibration_of(config)
    try:
        simulate_command(config, trace=trace, steps=steps, what_if=what_if, plot=plot, calibrate=calibrate,
                         against_cluster=cluster_calibration, as_json=as_json)
    except ValueError as e:  # ConfigError, CostModelError, TraceError, SimError all derive from ValueError
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
