"""`moe-runtime`: up | status | forward | generate | serve | train | down | logs | checkpoint | restore | plot |
config show | simulate | flops (`--name N` picks the cluster; `--version`).

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


def _load(config: Optional[Path], checkpoint: Optional[Path] = None, **overrides: dict) -> RuntimeConfig:
    """The config file, with the model of an HF checkpoint (--checkpoint, or the file's model.checkpoint).
    config None: the running cluster's config when one is up, else cluster/local.yaml."""
    from moe_runtime.checkpoint.hf_config import CheckpointError
    from moe_runtime.checkpoint.run_config import load_run_config
    from moe_runtime.ops_cli import default_config

    if config is None and checkpoint is None:  # the running cluster's checkpoint comes with its config
        checkpoint = _running_checkpoint()
    config = default_config(config, DEFAULT_CONFIG)
    try:
        cfg = load_run_config(config, checkpoint)
        if cfg.model.checkpoint is not None:
            from moe_runtime.checkpoint.hf_config import merge_model_config

            given = {k: v for k, v in overrides.get("model", {}).items() if v is not None}
            merge_model_config(cfg.model, given, "the command line", cfg.model.checkpoint)  # contradictions
        if overrides:
            data = cfg.model_dump()
            for section, values in overrides.items():
                data[section].update({k: v for k, v in values.items() if v is not None})
            from moe_runtime.config import parse_config

            cfg = parse_config(data, source=f"{config} (with command-line overrides)")
        return cfg
    except (ConfigError, CheckpointError) as e:
        err.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2) from None


CHECKPOINT_HELP = "HF-layout Yuan checkpoint directory: the model (config and weights) comes from it"


def _running_checkpoint() -> Optional[Path]:
    """model.checkpoint of the cluster that is up (None when none is up or it has none)."""
    from moe_runtime.runtime.session import running

    handle = running()
    model = ((handle.info.get("run_config") or {}).get("model") or {}) if handle is not None else {}
    return Path(model["checkpoint"]) if model.get("checkpoint") else None


def _same_model_as_daemon(cfg: RuntimeConfig) -> None:
    """With a checkpoint, a running cluster must run that model (else the call would silently use another)."""
    from moe_runtime.runtime.session import running

    handle = running()
    if handle is None:
        return
    theirs = handle.status().get("model")
    mine = cfg.model.model_dump(mode="json")
    if theirs is not None and (theirs.get("checkpoint") or mine.get("checkpoint")) and theirs != mine:
        err.print(f"[red]error:[/red] the cluster that is up runs model.checkpoint = {theirs.get('checkpoint')!r}, "
                  f"this call asks for {mine.get('checkpoint')!r}: `moe-runtime down` first (or drop --checkpoint)")
        raise typer.Exit(2)


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

    from pydantic import ValidationError

    from moe_runtime.config import _format_errors

    try:
        model = load_config(config).model if config else ModelConfig(preset=preset)
    except ValidationError as e:  # the preset: say what was wrong, not pydantic's text and link
        err.print(f"[red]error:[/red] --preset: {_format_errors(e, None)}")
        raise typer.Exit(2) from None
    except (ConfigError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if seq_len is not None and not 0 < seq_len <= model.max_seq_len:
        err.print(f"[red]error:[/red] --seq-len = {seq_len}: expected 1..{model.max_seq_len} (model.max_seq_len)")
        raise typer.Exit(2)
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
    config: Optional[Path] = typer.Option(None, help="runtime config (YAML; default: the running cluster's, else "
                                          "cluster/local.yaml)"),
    steps: Optional[int] = typer.Option(None, min=1, help="steps to train; on a running cluster N MORE steps from "
                                        "where it is (default: train.steps)"),
    router: Optional[str] = typer.Option(None, help="attention | linear (overrides model.router)"),
    routing: Optional[str] = typer.Option(None, help="topk | grouped | top_p | node_limited (model.routing)"),
    routing_groups: Optional[int] = typer.Option(None, help="grouped: expert groups G (model.routing_groups)"),
    top_p: Optional[float] = typer.Option(None, help="top_p: probability mass in (0, 1] (model.top_p)"),
    k_max: Optional[int] = typer.Option(None, help="top_p: most experts per token (model.k_max)"),
    dynamic_loss_coeff: Optional[float] = typer.Option(None, help="top_p: entropy loss coefficient"),
    max_nodes: Optional[int] = typer.Option(None, help="node_limited: most nodes per token (model.max_nodes)"),
    seed: Optional[int] = typer.Option(None, help="seed for weights and data order (overrides train.seed)"),
    in_process: bool = typer.Option(False, "--in-process", help="train in this process (the numerical oracle)"),
    plot: Optional[Path] = typer.Option(None, help="write a PNG with the loss curve and expert load"),
    record_trace: Optional[Path] = typer.Option(None, help="write the run's routing trace (.npz or .jsonl) for "
                                                "`simulate --trace` (cluster runs)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    resume: bool = typer.Option(False, "--resume", help="first restore the latest checkpoint under "
                                "train.checkpoint_dir, then train --steps more (cluster runs)"),
    steps_log: Optional[Path] = typer.Option(None, "--steps-log", help="per-step JSONL of this run (default: "
                                             "runs/train/<cluster name>-<time>.jsonl; `moe-runtime plot` draws it)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last stdout line"),
) -> None:
    """Train the model: on the cluster (default) or in-process. Prints one line per step (loss, lr, grad norm,
    step time, imbalance, rebalances) and writes them to a JSONL file."""
    if record_trace is not None and in_process:
        raise typer.BadParameter("--record-trace records a cluster run's routing; drop --in-process",
                                 param_hint="--record-trace")
    if record_trace is not None and record_trace.suffix not in (".npz", ".jsonl"):
        raise typer.BadParameter(f"{str(record_trace)!r}: expected a path ending in .npz or .jsonl",
                                 param_hint="--record-trace")
    routing_args = {"routing": routing, "routing_groups": routing_groups, "top_p": top_p, "k_max": k_max,
                    "dynamic_loss_coeff": dynamic_loss_coeff, "max_nodes": max_nodes}
    cfg = _load(config, checkpoint, model={"router": router, **routing_args}, train={"seed": seed, "steps": steps})
    _check_corpus_fits(cfg)
    if not in_process and cfg.model.checkpoint is not None:
        _same_model_as_daemon(cfg)
    from moe_runtime.ops_cli import StepSink, check_resume, train_n

    check_resume(cfg, resume, in_process)
    n = cfg.train.steps
    with _progress() as bar, StepSink(steps_log, bar.console, cfg, in_process) as sink:
        task = bar.add_task("train", total=n, info="")

        def on_step(step: int, loss: float) -> None:
            bar.update(task, completed=step + 1, info=f"loss {loss:.3f}")
            sink.progress(step, loss)

        if in_process:
            from moe_runtime.training import InProcessTrainer

            trainer = InProcessTrainer(cfg)
            if cfg.model.checkpoint is not None:
                from moe_runtime.checkpoint.hf_reader import HFCheckpoint
                from moe_runtime.checkpoint.in_process import load_state
                from moe_runtime.checkpoint.run_config import run_overrides

                load_state(trainer.model, HFCheckpoint(cfg.model.checkpoint, **run_overrides(cfg.model)))
            result = trainer.run(n, progress=on_step)
        else:
            from moe_runtime.ops_cli import on_cluster

            trace = str(record_trace.resolve()) if record_trace else None
            result = on_cluster(cfg, lambda cluster: train_n(cluster, cfg, n, resume, progress=on_step,
                                                             record_trace=trace, step_log=sink))
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


def _check_corpus_fits(cfg: RuntimeConfig) -> None:
    """The built-in corpus is byte-level (ids up to 258): a checkpoint with a smaller vocabulary cannot train on it."""
    from moe_runtime.data import VOCAB_SIZE_MIN

    if cfg.model.checkpoint is not None and cfg.data.source == "stdlib" and cfg.model.vocab_size < VOCAB_SIZE_MIN:
        err.print(f"[red]error:[/red] data.source = 'stdlib' is byte-level (token ids up to {VOCAB_SIZE_MIN - 1}) but "
                  f"the checkpoint's vocab_size is {cfg.model.vocab_size}")
        raise typer.Exit(2)
    if cfg.data.source == "files":  # read and tokenise here first: a bad file fails before anything starts
        from moe_runtime.data_files import load_file_corpus

        try:
            corpus = load_file_corpus(cfg.data, cfg.model)
        except ValueError as e:
            err.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None
        d = corpus.describe()
        err.print(f"data: {d['num_files']} files ({d['train_files']} train / {d['val_files']} val), "
                  f"{d['train_documents'] + d['val_documents']} documents (split by {d['split_by']}), "
                  f"{d['train_tokens']:,} train tokens ({d['tokenizer']} tokenizer)")


# ----------------------------------------------------------------------------------------------- cluster life


@app.command()
def up(config: Path = typer.Option(DEFAULT_CONFIG, help="runtime config (YAML)"),
       checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP)) -> None:
    """Start the cluster and leave it running (a daemon owns it; `down` stops it)."""
    from moe_runtime.ops_cli import print_up
    from moe_runtime.runtime.session import SessionError, current_name, log_file, start_daemon

    _load(config, checkpoint)
    err.print(f"cluster {current_name()!r}: daemon log {log_file()}")
    with err.status("starting the cluster (Ray, expert actors, router workers)..."):
        try:
            handle = start_daemon(config, checkpoint=checkpoint)
        except SessionError as e:
            err.print(f"[red]{e}[/red]")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted: stopped the daemon and everything it had started[/yellow]")
            raise typer.Exit(130) from None
    _print_status(handle.status())
    print_up(handle)


@app.command()
def down() -> None:
    """Stop the running cluster."""
    from moe_runtime.runtime.session import current_name, reaped, stop_daemon

    if stop_daemon():
        err.print(f"cluster stopped (name {current_name()!r})")
    else:
        err.print(f"no cluster is up (name {current_name()!r})" + (f": {reaped()}" if reaped() else ""))


@app.command()
def status(
    config: Path = typer.Option(DEFAULT_CONFIG, help="config to start a cluster with when none is up"),
    heatmap: Optional[Path] = typer.Option(None, help="write a PNG of load per layer x expert and per actor"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last stdout line"),
) -> None:
    """Placement, nodes, per-actor load and health of the running cluster."""
    from moe_runtime.runtime.session import running

    from moe_runtime.runtime.session import current_name, reaped

    handle = running()
    if handle is None:
        err.print(f"[yellow]no cluster is up[/yellow] (name {current_name()!r}; `moe-runtime up --config C` starts "
                  "one)" + (f"\n{reaped()}" if reaped() else ""))
        raise typer.Exit(1)
    st = handle.status()
    _print_status(st)
    from moe_runtime.ops_cli import print_expert_map

    print_expert_map(st, handle.info)
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
                      + (f"{measured:+.1%}" if measured is not None else "(pending)")
                      + " (gain in balancedness = mean / max load per actor: predicted on the load the decision "
                        "was made from, measured on the load routed since; routing drifts, so they differ)")


@app.command()
def forward(
    text: Optional[str] = typer.Option(None, help="prompt text (the checkpoint's tokenizer.model when it has one, "
                                       "else bytes are the tokens)"),
    token_ids: Optional[str] = typer.Option(None, "--token-ids", help="the tokens themselves, e.g. 5,17,42"),
    config: Optional[Path] = typer.Option(None, help="runtime config (YAML; default: the running cluster's, else "
                                          "cluster/local.yaml)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    top: int = typer.Option(5, help="how many next-token candidates to show"),
    generate: int = typer.Option(0, help="also continue the text greedily by this many tokens"),
    in_process: bool = typer.Option(False, "--in-process", help="use an in-process model (the checkpoint's "
                                                                  "weights, else untrained)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last stdout line "
                                                       "(token_ids, predictions, last_logits, continuation, degraded)"),
) -> None:
    """Run a forward pass and print next-token predictions."""
    import torch

    from moe_runtime.checkpoint.text import encode_for_model, parse_token_ids, tokenizer_for

    cfg = _load(config, checkpoint)
    if (text is None) == (token_ids is None):
        err.print("[red]error:[/red] give exactly one of --text or --token-ids")
        raise typer.Exit(2)
    try:
        run_tok = tokenizer_for(cfg.model)
        ids = (parse_token_ids(token_ids, cfg.model.vocab_size, cfg.model.max_seq_len) if token_ids is not None
               else encode_for_model(run_tok, text, cfg.model))
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if not 0 < top <= cfg.model.vocab_size:
        err.print(f"[red]error:[/red] --top = {top}: expected 1..{cfg.model.vocab_size}")
        raise typer.Exit(2)
    if generate < 0:
        err.print(f"[red]error:[/red] --generate = {generate}: expected a number of new tokens >= 0")
        raise typer.Exit(2)
    tokens = torch.tensor([ids], dtype=torch.long)
    from moe_runtime.generate_command import degraded_of, merge_degraded, per_prompt_params, run_generate

    greedy = per_prompt_params(1, max(generate, 1), 0.0, 0, 1.0, None)

    def run(model_forward, greedy=None, cluster=None) -> dict:
        last_v = model_forward(tokens)[0, -1].float()
        degraded = degraded_of(cluster)  # [layer, expert] the forward ran without (on_expert_failure = mask)
        probs = torch.softmax(last_v, dim=-1)
        best = torch.topk(probs, top)
        preds = [{"token": int(t), "text": run_tok.piece(int(t)), "prob": float(p), "logit": float(last_v[t])}
                 for p, t in zip(best.values, best.indices)]
        cont = greedy(ids) if generate else None  # the cached engine of `moe-runtime generate`
        new = cont.completions[0].new_token_ids if cont is not None else []
        degraded = merge_degraded(degraded, cont.extra["degraded"] if cont is not None else [])
        return {"token_ids": ids, "predictions": preds, "continuation": run_tok.tokenizer.decode(new) if new else "",
                "continuation_ids": new, "last_logits": last_v.tolist(), "tokenizer": run_tok.kind,
                "degraded": degraded}

    if in_process:
        if cfg.model.checkpoint is not None:
            from moe_runtime.checkpoint.hf_reader import HFCheckpoint
            from moe_runtime.checkpoint.in_process import load_model
            from moe_runtime.checkpoint.run_config import run_overrides

            model = load_model(HFCheckpoint(cfg.model.checkpoint, **run_overrides(cfg.model))).eval()
        else:
            from moe_runtime.model.transformer import build_model

            model = build_model(cfg.model, cfg.train.seed).eval()
        with torch.no_grad():
            result = run(lambda t: model(t).logits.detach(),
                         lambda p: run_generate(cfg, [p], greedy, in_process=True, stream=None, model=model))
    else:
        from moe_runtime.ops_cli import on_cluster, warn_fresh_cluster

        _same_model_as_daemon(cfg)
        warn_fresh_cluster(cfg)
        result = on_cluster(cfg, lambda c: run(c.forward, lambda p: run_generate(
            cfg, [p], greedy, in_process=False, stream=None, cluster=c), cluster=c))
    shown = text[-40:] if text is not None else ids[-8:]
    table = Table(title=f"next token after {shown!r}")
    table.add_column("token")
    table.add_column("probability", justify="right")
    for p in result["predictions"]:
        table.add_row(f"{p['text']!r} ({p['token']})", f"{p['prob']:.3f}")
    err.print(table)
    if generate:
        err.print(f"greedy continuation: {result['continuation']!r}")
    if result["degraded"]:
        err.print(f"[yellow]degraded:[/yellow] computed without experts (layer, expert) {result['degraded']}: no live "
                  "replica (transport.on_expert_failure = mask)")
    if as_json:
        _emit_json(result)


@app.command("generate")
def generate_cmd(
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="prompt text (repeat for a batch)"),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="one prompt per non-empty line"),
    token_ids: Optional[list[str]] = typer.Option(None, "--token-ids", help="a prompt as token ids: 1,2,3 "
                                                  "(repeat for a batch)"),
    max_new_tokens: int = typer.Option(..., "--max-new-tokens", help="new tokens per prompt (at most)"),
    temperature: float = typer.Option(1.0, help="0 = greedy"),
    top_k: int = typer.Option(0, "--top-k", help="sample from the k most likely tokens (0 = all)"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass (1 = all)"),
    seed: Optional[int] = typer.Option(None, help="sampling seed (prompt i uses seed + i)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    config: Path = typer.Option(DEFAULT_CONFIG, help="runtime config (YAML)"),
    in_process: bool = typer.Option(False, "--in-process", help="run the model in this process"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last stdout line "
                                                       "(new_token_ids and text per prompt, finish_reason, rates, "
                                                       "degraded)"),
) -> None:
    """Cached generation (KV / LFA caches, continuous batching) on the cluster or in process; tokens stream as
    they come (to stdout, or to stderr with --json)."""
    from moe_runtime.checkpoint.text import parse_token_ids
    from moe_runtime.generate_command import TerminalStream, per_prompt_params, read_prompts_file, run_generate

    cfg = _load(config, checkpoint)
    try:
        prompts: list = list(prompt or [])
        if prompts_file is not None:
            prompts += read_prompts_file(prompts_file)
        prompts += [parse_token_ids(t, cfg.model.vocab_size, cfg.model.max_seq_len) for t in token_ids or []]
        if not prompts:
            raise ValueError("no prompt: give --prompt TEXT, --prompts-file F or --token-ids 1,2,3")
        params = per_prompt_params(len(prompts), max_new_tokens, temperature, top_k, top_p, seed)
        runner = None
        if not in_process:
            from moe_runtime.ops_cli import on_cluster, warn_fresh_cluster

            _same_model_as_daemon(cfg)
            warn_fresh_cluster(cfg)
            runner = on_cluster
        stream = TerminalStream(sys.stderr if as_json else sys.stdout, len(prompts))
        result = run_generate(cfg, prompts, params, in_process=in_process, stream=stream, runner=runner)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    out = result.to_json()
    rate, ttft = out["decode_tokens_per_s"], out["time_to_first_token_s"]
    err.print(f"{result.new_tokens} new tokens for {len(prompts)} prompt(s) in {result.seconds:.2f} s"
              + (f", time to first token {ttft * 1e3:.0f} ms" if ttft is not None else "")
              + (f", decode {rate:,.1f} tokens/s" if rate else "")
              + f"; finish: {', '.join(out['finish_reason'])}")
    if out["degraded"]:
        err.print(f"[yellow]degraded:[/yellow] computed without experts (layer, expert) {out['degraded']}: no live "
                  "replica (transport.on_expert_failure = mask)")
    if as_json:
        _emit_json(out)


@app.command()
def export(
    checkpoint_out: Path = typer.Option(..., "--checkpoint-out", help="new directory for the HF-layout export"),
    config: Optional[Path] = typer.Option(None, help="runtime config (YAML; default: the running cluster's, else "
                                          "cluster/local.yaml), for a cluster started for this call"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    dtype: Optional[str] = typer.Option(None, help="bfloat16 | float16 | float32 (default: the imported "
                                        "checkpoint's dtype, else bfloat16)"),
    max_shard_mb: Optional[int] = typer.Option(None, help="largest shard file in MiB (default 4096)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last stdout line"),
) -> None:
    """Export the cluster's weights as an HF-layout Yuan checkpoint (config.json, index, safetensors shards),
    written by the parties that hold them: the running cluster's, or a cluster started for this call."""
    dtypes = {"bfloat16", "float16", "float32"}
    if dtype is not None and dtype not in dtypes:
        err.print(f"[red]error:[/red] --dtype = {dtype!r}: expected one of {sorted(dtypes)}")
        raise typer.Exit(2)
    if max_shard_mb is not None and max_shard_mb <= 0:
        err.print(f"[red]error:[/red] --max-shard-mb = {max_shard_mb}: expected a positive number of MiB")
        raise typer.Exit(2)
    out = checkpoint_out.expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        err.print(f"[red]error:[/red] --checkpoint-out = {str(out)!r}: exists and is not empty")
        raise typer.Exit(2)
    import torch

    from moe_runtime.ops_cli import on_cluster
    from moe_runtime.runtime.session import running

    cfg = _load(config, checkpoint)
    if checkpoint is not None:
        _same_model_as_daemon(cfg)
    elif running() is None and cfg.model.checkpoint is None:
        err.print("[yellow]no cluster is up and no --checkpoint: exporting a cluster's initial weights[/yellow]")
    kwargs = {"dtype": getattr(torch, dtype) if dtype else None,
              "max_shard_bytes": max_shard_mb << 20 if max_shard_mb else None}
    try:
        report = on_cluster(cfg, lambda c: c.save_hf(str(out), **kwargs))
    except ValueError as e:  # CheckpointError: e.g. a model the HF layout cannot hold (linear router, no LFA)
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    err.print(f"exported to {out} in {report['seconds']:.1f} s")
    if as_json:
        _emit_json(report)


@app.command("serve")
def serve_cmd(
    config: Path = typer.Option(DEFAULT_CONFIG, help="runtime config (YAML)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    port: int = typer.Option(8000, help="HTTP port (0: any free one)"),
    host: str = typer.Option("127.0.0.1", help="address to bind (local mode: keep loopback)"),
    in_process: bool = typer.Option(False, "--in-process", help="serve an in-process model instead of the cluster"),
) -> None:
    """OpenAI-style /v1/completions (\"stream\": true for server-sent events) over one continuous batch."""
    from moe_runtime.generate_command import in_process_model, local_engine
    from moe_runtime.serving import serve_forever

    cfg = _load(config, checkpoint)
    if not 0 <= port < 65536:
        err.print(f"[red]error:[/red] --port = {port}: expected 0..65535")
        raise typer.Exit(2)
    name = Path(cfg.model.checkpoint).name if cfg.model.checkpoint else (cfg.model.preset or "moe-runtime")

    def ready(bound: int) -> None:
        err.print(f"serving {name!r} on http://{host}:{bound}/v1/completions ({'in process' if in_process else 'cluster'})"
                  "; Ctrl-C stops")

    if in_process:
        serve_forever(local_engine(in_process_model(cfg), cfg.model), name, host, port, ready)
        return
    from moe_runtime.runtime.cluster import Cluster

    with err.status("starting the cluster (Ray, expert actors, router workers)..."):
        cluster = Cluster.start(cfg)
    with cluster:
        # the state served, saved: a restarted actor whose shards have no live replica reloads them from it when
        # the cluster heals (runtime/failover.py), so serving returns to unmasked answers without a restart
        start = cluster.checkpoint(Path(cfg.train.checkpoint_dir) / "serve")
        err.print(f"serving state saved to {start} (what a lost expert actor reloads)")
        serve_forever(cluster.generation_engine(), name, host, port, ready)


@app.command()
def simulate(
    config: Path = typer.Option(Path("cluster/sim-64gpu.yaml"), help="config with a sim section"),
    trace: Optional[str] = typer.Option(None, help="routing trace file to replay, or uniform | zipf | drift"),
    steps: Optional[int] = typer.Option(None, help="steps of the trace to simulate"),
    what_if: Optional[str] = typer.Option(None, "--what-if", help="rebalance: static vs the scheduler's placement; "
                                          "overlap: transport.overlap none vs two_batch (overlap_vs_none_step_time)"),
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


from moe_runtime import ops_cli as _ops_cli  # noqa: E402,F401 - registers --name, --version, logs, config, ...
from moe_runtime import scale_cli as _scale_cli  # noqa: E402,F401 - registers `scale`


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    from moe_runtime.cli import main as _main  # the imported module's app: ops_cli registers its commands there

    _main()
