"""Rebalancing on recorded training load: our placement policy (`decide`) vs DeepSeek EPLB vs the static plan.

    python benchmarks/rebalance_recorded.py [--quick] [--json] [--steps 30] [--every 5] [--threads 1]

InProcessTrainer (the numerical oracle of the cluster: same routing) trains on the corpus (`small` preset,
4 layers x 16 experts, 30 steps; --quick: `tiny` with 16 experts, 10 steps); each step's expert_load [L, E]
feeds a LoadTracker (EMA, decay 0.8). Every K steps (5; --quick 2) ours and EPLB re-plan from the EMA snapshot
for 4 and 8 actors; each placement is scored on the loads of the steps that follow it (a plan is only ever
judged on load it has not seen). Bytes per expert copy: `expert_state_bytes` of the trained model.

Last stdout line (and runs/bench/rebalance_recorded.json): balancedness_static / _ours / _eplb (means over the
actor counts), bytes_moved_ours_vs_eplb (sum of our copies / sum of aligned-EPLB copies), the detail under
"recorded". The raw per-step loads go to runs/bench/rebalance_recorded_load.jsonl (LoadTracker.load_jsonl).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from benchmarks._common import emit
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
)
from moe_runtime.model.accounting import expert_state_bytes
from moe_runtime.placement import Placement, copies_between
from moe_runtime.scheduler.eplb import eplb_placement
from moe_runtime.scheduler.load import LoadSnapshot, LoadTracker
from moe_runtime.scheduler.policy import Capacities, align_actors, decide

NAME = "rebalance_recorded"
ACTORS = (4, 8)
EMA_DECAY = 0.8


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
        "bytes_per_expert": expert_state_bytes(m),
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
        c_ours += copies_between(ours, dec.placement)
        c_raw += copies_between(eplb_raw, new_raw)
        c_al += copies_between(eplb_al, new_al)
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
        "balancedness_static": mean_or_none(scored["static"]),
        "balancedness_ours": mean_or_none(scored["ours"]),
        "balancedness_eplb": mean_or_none(scored["eplb"]),
        "balancedness_ours_on_snapshot": mean_or_none(at_decision["ours"]),
        "balancedness_eplb_on_snapshot": mean_or_none(at_decision["eplb"]),
        **copies_and_bytes(c_ours, c_al, c_raw, bytes_per_expert),
        "bytes_moved_ours_vs_eplb": ratio(c_ours, c_al),
        "bytes_moved_ours_vs_eplb_raw": ratio(c_ours, c_raw),
        "decide_wall_s_mean": mean_or_none(decide_wall),
    }


def run_recorded(
    preset: str,
    num_experts: int | None,
    steps: int,
    every: int,
    actors: Sequence[int],
    threads: int,
    decay: float = EMA_DECAY,
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


def headline(recorded: dict) -> dict:
    """Means over the actor counts of the balance on unseen steps; bytes ratios over the summed copies."""
    rows = recorded["per_actors"]
    c_ours = sum(r["copies_ours"] for r in rows)

    def mean_of(key: str) -> float | None:
        vals = [r[key] for r in rows if r[key] is not None]
        return mean_or_none(vals)

    return {
        "balancedness_static": mean_of("balancedness_static"),
        "balancedness_ours": mean_of("balancedness_ours"),
        "balancedness_eplb": mean_of("balancedness_eplb"),
        "bytes_moved_ours_vs_eplb": ratio(c_ours, sum(r["copies_eplb_aligned"] for r in rows)),
        "bytes_moved_ours_vs_eplb_raw": ratio(c_ours, sum(r["copies_eplb_raw"] for r in rows)),
    }


def add_args(p) -> None:
    p.add_argument("--steps", type=int, default=None, help="training steps recorded (default 30; quick 10)")
    p.add_argument(
        "--every", type=int, default=None, help="re-plan every K recorded steps (default 5; quick 2)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads for the training run (default 1)")


def run_from_args(args, load_log: Path | None, progress=None) -> dict:
    preset, experts = ("tiny", 16) if args.quick else ("small", None)
    steps = args.steps or (10 if args.quick else 30)
    every = args.every or (2 if args.quick else 5)
    return run_recorded(
        preset, experts, steps, every, ACTORS, args.threads, load_log=load_log, progress=progress
    )


def print_table(console, rec: dict) -> None:
    from rich.table import Table

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
            fmt(r["balancedness_static"]), fmt(r["balancedness_ours"]), fmt(r["balancedness_eplb"]),
            str(r["copies_ours"]), str(r["copies_eplb_aligned"]), str(r["copies_eplb_raw"]),
        )  # fmt: skip
    console.print(t)


def main(argv: list[str] | None = None) -> dict:
    run = ScriptRun.start(NAME, __doc__.split("\n\n")[0], [add_args], argv)
    args = run.args
    recorded = run_from_args(args, args.out.with_name(args.out.stem + "_load.jsonl"), run.console.log)
    result = {
        "bench": NAME,
        **headline(recorded),
        "policy_params": policy_params_json(),
        "quick": args.quick,
        "recorded": recorded,
        **run.clock(),
    }
    print_table(run.console, recorded)
    if not args.json:
        print(
            f"{NAME}: B static {fmt(result['balancedness_static'])}, "
            f"ours {fmt(result['balancedness_ours'])}, EPLB {fmt(result['balancedness_eplb'])}; "
            f"bytes ours/EPLB {fmt(result['bytes_moved_ours_vs_eplb'])} "
            f"(raw {fmt(result['bytes_moved_ours_vs_eplb_raw'])})"
        )
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
