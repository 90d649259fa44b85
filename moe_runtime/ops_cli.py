"""Operations commands and helpers of `moe-runtime` (cluster names, logs, config show, checkpoint / restore,
--version) and what train / forward / up share to talk to a cluster. Registered on cli.app by cli.py."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer
from rich.markup import escape

from moe_runtime.cli import app, err
from moe_runtime.config import RuntimeConfig

T = TypeVar("T")


def _flag_type_hidden() -> None:
    """typer 0.29's rich help prints `<bool>` as the type of every flag (even --help): a flag takes no value, so
    show none."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_flags_hidden", False):  # another typer: leave its help as it is
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    display_type_rich._flags_hidden = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flag_type_hidden()
err.soft_wrap = True  # messages carry paths and addresses: never break them at 80 columns (tables still fit)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moe-runtime")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "unknown"


def _show_version(value: bool) -> None:
    if value:
        import ray
        import torch

        sys.stdout.write(f"moe-runtime {_version()} (torch {torch.__version__}, ray {ray.__version__})\n")
        raise typer.Exit(0)


@app.callback()
def _global(
    name: Optional[str] = typer.Option(None, "--name", help="cluster name for up / down / status / train / forward "
                                       "/ logs (default: one per working directory)"),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="print the version and exit"),
) -> None:
    """`moe-runtime`: up | status | forward | generate | serve | train | down | logs | checkpoint | restore | config
    | simulate | flops. Human output goes to stderr; with --json the LAST stdout line is one JSON object."""
    from moe_runtime.runtime.session import SessionError, set_name

    try:
        set_name(name)
    except SessionError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


# ----------------------------------------------------------------------------------------------- shared helpers


def default_config(config: Optional[Path], default: Path) -> Path:
    """The config a command uses: the one given, else the running cluster's, else `default`."""
    if config is not None:
        return config
    from moe_runtime.runtime.session import running

    handle = running()
    if handle is not None and handle.info.get("config"):
        return Path(handle.info["config"])
    return default


def on_cluster(cfg: RuntimeConfig, fn: Callable[[Any], T]) -> T:
    """session.run_on_cluster with its errors (a contradicting config, a cluster that cannot start or be
    joined) printed as one red message and exit code 1, not a traceback."""
    from moe_runtime.runtime.ray_env import ClusterStartError
    from moe_runtime.runtime.session import SessionError, run_on_cluster

    try:
        return run_on_cluster(cfg, fn)
    except (SessionError, ClusterStartError) as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None


def warn_fresh_cluster(cfg: RuntimeConfig) -> None:
    """forward / generate without a running cluster start one for this call: with untrained weights unless the
    model comes from a checkpoint. Say so."""
    from moe_runtime.runtime.session import current_name, running

    if running() is not None:
        return
    weights = (f"weights from {cfg.model.checkpoint}" if cfg.model.checkpoint else
               f"UNTRAINED weights (seed {cfg.train.seed})")
    err.print(f"[yellow]no cluster {current_name()!r} is up:[/yellow] starting one for this call with {weights}; "
              "`moe-runtime up` then `train` keeps a trained one (or `restore` a checkpoint)")


class StepSink:
    """Per-step records of one `train` run: a line each on the terminal (above the progress bar) and a line each
    in the run's JSONL file. Cluster runs call it with full records (runtime/step_log.py); in-process runs
    through `progress` (loss, lr, step time)."""

    def __init__(self, path: Optional[Path], console: Any, cfg: RuntimeConfig, in_process: bool):
        from moe_runtime.runtime.session import current_name

        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.path = path or Path("runs/train") / f"{'in-process' if in_process else current_name()}-{stamp}.jsonl"
        self.console, self.cfg, self.in_process = console, cfg, in_process
        self._rebalances: int | None = None
        self._t = time.perf_counter()

    def __enter__(self) -> StepSink:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w")
        err.print(f"per-step log: {self.path}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def progress(self, step: int, loss: float) -> None:
        if self.in_process:
            from moe_runtime.runtime.step_log import in_process_record

            now = time.perf_counter()
            self(in_process_record(step, loss, now - self._t, self.cfg))
            self._t = now

    def __call__(self, rec: dict) -> None:
        from moe_runtime.runtime.step_log import format_line

        rebalanced = self._rebalances is not None and rec.get("rebalances", 0) > self._rebalances
        self._rebalances = rec.get("rebalances", 0)
        rec = {**rec, "rebalanced": rebalanced}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        self.console.print(format_line(rec, rebalanced), highlight=False)


def check_resume(cfg: RuntimeConfig, resume: bool, in_process: bool) -> None:
    if not resume:
        return
    from moe_runtime.checkpoint import training_state as ckpt

    if in_process:
        err.print("[red]error:[/red] --resume restores a cluster checkpoint: drop --in-process")
        raise typer.Exit(2)
    root = Path(cfg.train.checkpoint_dir).resolve()
    try:
        ckpt.load_manifest(root, verify=False)
    except (OSError, ValueError, ckpt.CheckpointError) as e:
        err.print(f"[red]error:[/red] --resume: no checkpoint to resume from under train.checkpoint_dir = "
                  f"{str(root)!r} ({e})")
        raise typer.Exit(2) from None


def train_n(cluster: Any, cfg: RuntimeConfig, n: int, resume: bool, **kwargs: Any) -> Any:
    """`n` more steps from where `cluster` is (a running daemon's handle or a Cluster started for this call),
    after restoring the latest checkpoint when `resume`. Says where it starts and whose LR schedule it follows."""
    if resume:
        step = cluster.restore(str(Path(cfg.train.checkpoint_dir).resolve()))
        err.print(f"resumed from {cfg.train.checkpoint_dir} at step {step}")
    if hasattr(cluster, "train_more"):
        info = cluster.info
        theirs = (info.get("run_config") or {}).get("train", {}).get("steps")
        err.print(f"cluster {info.get('name')!r} is up: training {n} more step(s) from where it is; the LR schedule "
                  f"is the cluster's (train.steps = {theirs} of its config)")
        return cluster.train_more(n, **kwargs)
    return cluster.train(cluster.step + n, **kwargs)


def print_up(handle: Any) -> None:
    info = handle.info
    err.print(f"cluster is up: name {info.get('name')!r} (Ray: {info.get('ray_mode')}"
              + (f" at {info['ray_address']}" if info.get("ray_address") else "") + ")")
    if info.get("dashboard_url"):
        err.print(f"Ray dashboard: {info['dashboard_url']}")
    err.print(f"daemon pid {info.get('pid')}, log {info.get('log')} (`moe-runtime logs`)")
    err.print("`moe-runtime train`, `forward` and `status` use it; `moe-runtime down` stops it")


def print_expert_map(st: dict, info: dict) -> None:
    """(layer, expert) -> actors and the token copies each expert served, one row per layer."""
    from rich.table import Table

    load, emap = st.get("expert_load"), st.get("expert_map")
    if not load or not emap:
        return
    experts = len(load[0])
    table = Table(title="experts: actors holding each (layer, expert) and token copies served", title_justify="left")
    table.add_column("layer")
    for e in range(experts):
        table.add_column(f"e{e}", justify="right")
    for layer, row in enumerate(load):
        table.add_row(str(layer), *[f"a{','.join(map(str, emap[f'{layer},{e}']))}\n{row[e]:,}" for e in range(experts)])
    err.print(table)
    if info.get("dashboard_url"):
        err.print(f"Ray dashboard: {info['dashboard_url']}")
    err.print(f"daemon log: {info.get('log')}")


def _handle_or_exit() -> Any:
    from moe_runtime.runtime.session import current_name, reaped, running

    handle = running()
    if handle is None:
        err.print(f"[yellow]no cluster is up[/yellow] (name {current_name()!r}; `moe-runtime up --config C` starts "
                  "one)" + (f"\n{reaped()}" if reaped() else ""))
        raise typer.Exit(1)
    return handle


# ----------------------------------------------------------------------------------------------- commands


@app.command()
def logs(
    lines: int = typer.Option(50, min=0, help="how many last lines to print"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new lines (Ctrl-C stops)"),
) -> None:
    """Print the cluster daemon's log (its path is printed by `up`)."""
    from moe_runtime.runtime.session import current_name, log_file

    path = log_file()
    if not path.exists():
        err.print(f"[yellow]no log for cluster {current_name()!r}[/yellow] (expected {path}; `up` writes it)")
        raise typer.Exit(1)
    err.print(f"{path}:")
    with open(path, errors="replace") as f:
        text = f.read()
        sys.stdout.write("\n".join(text.splitlines()[-lines:]) + ("\n" if lines and text else ""))
        sys.stdout.flush()
        try:
            while follow:
                chunk = f.read()
                if chunk:
                    sys.stdout.write(chunk)
                    sys.stdout.flush()
                else:
                    time.sleep(0.5)
        except KeyboardInterrupt:
            pass


@app.command("checkpoint")
def checkpoint_cmd(
    path: Path = typer.Argument(..., help="checkpoint root directory (a step-N directory is written under it)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last stdout line"),
) -> None:
    """Save the running cluster's whole training state (weights, optimizer, step, placement)."""
    from moe_runtime.runtime.session import SessionError

    handle = _handle_or_exit()
    try:
        step_dir = handle.checkpoint(str(path.resolve()))
    except SessionError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    err.print(f"checkpoint written to {step_dir} (`moe-runtime restore {path}` loads it)")
    if as_json:
        sys.stdout.write(json.dumps({"checkpoint": str(step_dir)}) + "\n")


@app.command("restore")
def restore_cmd(
    path: Path = typer.Argument(..., help="checkpoint root (its latest step) or a step-N directory"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last stdout line"),
) -> None:
    """Load a checkpoint into the running cluster; training goes on from its step."""
    from moe_runtime.runtime.session import SessionError

    handle = _handle_or_exit()
    if not path.exists():
        err.print(f"[red]error:[/red] checkpoint {str(path)!r} does not exist")
        raise typer.Exit(2)
    try:
        step = handle.restore(str(path.resolve()))
    except SessionError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    err.print(f"restored {path}: the cluster is at step {step}")
    if as_json:
        sys.stdout.write(json.dumps({"step": step}) + "\n")


config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    config: Optional[Path] = typer.Option(None, help="config file (default: the running cluster's, else "
                                          "cluster/local.yaml)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last stdout line"),
) -> None:
    """The effective config: the file with every default filled in."""
    import yaml

    from moe_runtime.cli import DEFAULT_CONFIG, _load

    path = default_config(config, DEFAULT_CONFIG)
    cfg = _load(path)
    data = cfg.model_dump(mode="json")
    err.print(f"# effective config of {path} (defaults filled in)")
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))


@app.command("plot")
def plot_cmd(
    run: Path = typer.Argument(..., help="a per-step JSONL written by `train` (runs/train/*.jsonl)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG to write (default: next to the JSONL)"),
) -> None:
    """Draw a training run's per-step log: loss, lr, grad norm, step time and load imbalance, with rebalances."""
    from moe_runtime.plots import plot_steps

    if not run.exists():
        err.print(f"[red]error:[/red] {str(run)!r} does not exist (train writes runs/train/<name>-<time>.jsonl)")
        raise typer.Exit(2)
    records = []
    for i, line in enumerate(run.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                err.print(f"[red]error:[/red] {run}, line {i}: not JSON")
                raise typer.Exit(2) from None
    if not records:
        err.print(f"[red]error:[/red] {run} has no step records")
        raise typer.Exit(2)
    out = out or run.with_suffix(".png")
    plot_steps(records, out, title=run.stem)
    err.print(f"wrote {out}")
