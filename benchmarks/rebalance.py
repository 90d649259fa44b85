"""Expert rebalancing: our placement policy (scheduler/policy.py `decide`) against DeepSeek EPLB, in one run.

    python benchmarks/rebalance.py [--quick [--cluster-in-quick]] [--json] [--skip-cluster] [--skip-recorded]

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
3. Cluster (skewed step time, static vs rebalanced; `measure_cluster_skew`): a real local cluster of 2 expert
   actors + 1 router worker, one torch thread each (tiny preset with a linear router, hidden 128, FFN 2048, 8
   experts, top-2; batch 8 x 128 tokens; lr 1e-4). After Cluster.start the router worker gets skewed dense
   weights (load_model_state): a constant embedding channel read by the router rows of experts 0 and 1, so every
   token's top-2 is {0, 1}, both on actor 0 under the contiguous placement (the measured actor shares are in
   the JSON). 3 warm-up steps, then 4 rounds of [5 steps static, 5 steps rebalanced]: the first switch is
   cluster.rebalance() (the policy decides from the tracked load and migrates live), later switches re-apply
   either placement, so both are measured interleaved. skewed_step_time_static_vs_rebalanced = median step_s
   static / median step_s rebalanced (> 1: rebalancing helped); the machine's load average at start and end
   is recorded (the cores are shared, so absolute times vary between runs). --skip-cluster skips it; --quick
   skips it too (cluster_part_reason says why) unless --cluster-in-quick (1 round of 3 + 3 steps).

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
from moe_runtime.placement import Placement
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



def _copies(ours: int, eplb_aligned: int, eplb_raw: int, bytes_per_expert: int) -> dict[str, int]:
    """Expert copies of each plan and the bytes they move (weights + AdamW state per copy)."""
    return {
        "copies_ours": ours,
        "copies_eplb_aligned": eplb_aligned,
        "copies_eplb_raw": eplb_raw,
        "bytes_ours": ours * bytes_per_expert,
        "bytes_eplb_aligned": eplb_aligned * bytes_per_expert,
        "bytes_eplb_raw": eplb_raw * bytes_per_expert,
    }

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
            **_copies(c_ours, c_al, c_raw, bytes_per_expert),
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
        **_copies(c_ours, c_al, c_raw, bytes_per_expert),
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

CLUSTER_QUICK = {"warmup": 2, "steps_per_phase": 3, "rounds": 1}
CLUSTER_QUICK_REASON = (
    "skipped under --quick: starting Ray and the 2-actor cluster alone takes most of the 60 s quick budget on this "
    "machine; run without --quick, or --quick --cluster-in-quick for 1 round of 3 + 3 steps"
)
CLUSTER_SKEW_CHANNEL = 0  # hidden channel carrying the constant that the skewed router weights read
CLUSTER_EMBED_CONST = 0.5  # embed[:, channel] for every token (~25x the init std 0.02)
# router weight[e, channel] of the hot experts 0 and 1 (both on actor 0 under Placement.contiguous): logit gap
# ~1 between them and ~10 to the rest, against a token-dependent part of std ~0.1, so every token's top-2 is
# {0, 1}: a stationary skew (closer gains let the split among hot experts drift as training goes on, and the
# policy would then plan on load that is gone by the time it is measured)
CLUSTER_ROUTER_GAIN = (1.0, 0.9)
CLUSTER_HOT = (0, 1)


def _cluster_config(hidden: int, ffn: int, batch: int, seq_len: int, seed: int):
    from moe_runtime.config import parse_config

    return parse_config({
        "model": {"preset": "tiny", "router": "linear", "hidden_size": hidden, "ffn_hidden_size": ffn,
                  "num_heads": max(1, hidden // 32), "head_dim": 32, "num_experts": 8, "top_k": 2},
        "data": {"max_files": 40},
        # lr 1e-4: AdamW moves each weight by <= ~lr per step, so the routing (hence the load the policy plans
        # on) stays stationary over the run; step time does not depend on the learning rate
        "train": {"steps": 10_000, "batch_size": batch, "seq_len": seq_len, "micro_batches": 1, "lr": 1e-4,
                  "min_lr": 1e-5, "warmup_steps": 0, "checkpoint_every": 0, "seed": seed},
        "cluster": {"num_gpus": 2, "expert_actors": 2, "router_workers": 1, "torch_threads": 1},
        "scheduler": {"enabled": False},  # we call rebalance() ourselves between the measured phases
    })  # fmt: skip


def skewed_dense_state(cfg, hot: Sequence[int] = CLUSTER_HOT) -> dict:
    """The oracle's initial dense weights (build_model(cfg.model, train.seed), what Cluster.start loaded) with a
    skewed router: embedding channel CLUSTER_SKEW_CHANNEL set to a constant for every token (a bias-like input:
    after RMSNorm every token's router input has a large positive value there; the tied LM head's logits all
    shift by the same amount, so the softmax is unchanged) and every layer's router row of each `hot` expert
    reading that channel with a large gain. Token copies then go top-2 among the hot experts."""
    import torch

    from moe_runtime.model.transformer import build_model
    from moe_runtime.runtime.router_worker import dense_state_from_full

    dense = dense_state_from_full(build_model(cfg.model, seed=cfg.train.seed), cfg)
    ch = CLUSTER_SKEW_CHANNEL
    dense["embed.weight"][:, ch] = CLUSTER_EMBED_CONST
    for layer in range(cfg.model.num_layers):
        w = dense[f"layers.{layer}.moe.router.weight"]
        if w.shape != (cfg.model.num_experts, cfg.model.hidden_size):
            raise ValueError(
                f"router weight of layer {layer} has shape {tuple(w.shape)}: expected a linear router"
            )
        for e, g in zip(hot, CLUSTER_ROUTER_GAIN):
            w[e, ch] = g
    return {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in dense.items()}


def _actor_tokens(cluster) -> list[int]:
    """Token copies each expert actor served (its Dispatch counter) since the last call; resets the counters."""
    import ray

    counts = ray.get([a.token_counts.remote(True) for a in cluster.experts], timeout=60)
    return [int(sum(c.values())) for c in counts]


def _shares(tokens: Sequence[int]) -> list[float] | None:
    total = sum(tokens)
    return [t / total for t in tokens] if total else None


def measure_cluster_skew(
    hidden: int = 128,
    ffn: int = 2048,
    batch: int = 8,
    seq_len: int = 128,
    warmup: int = 3,
    steps_per_phase: int = 5,
    rounds: int = 4,
    seed: int = 0,
    progress=None,
) -> dict:
    """Step time of a skewed router on the real local cluster (2 expert actors, 1 router worker, one torch thread
    each), static contiguous placement vs the policy's rebalanced placement.

    Start the cluster, push skewed dense weights (`skewed_dense_state`: hot experts 0 and 1, both on actor 0 under
    Placement.contiguous) to the router worker with load_model_state, run `warmup` steps, then `rounds` x
    [static phase, rebalanced phase] of `steps_per_phase` steps each. Every step's expert_load feeds the
    cluster's scheduler tracker (`scheduler.observe`; the scheduler itself is disabled). The first switch is
    `cluster.rebalance()`: the policy decides from the EMA snapshot and migrates live; later switches re-apply
    the static placement / that decision's placement (`cluster.rebalance(placement)`), so the two placements
    are measured interleaved on the same (shared) machine. Reported: median step_s per placement and their
    ratio, the token share each actor actually served per phase (its Dispatch counters), the decision."""
    import ray

    from moe_runtime.runtime.cluster import Cluster
    from moe_runtime.scheduler.hook import describe

    log = progress or (lambda *_: None)
    cfg = _cluster_config(hidden, ffn, batch, seq_len, seed)
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    out: dict = {
        "config": {"model": {"preset": "tiny", "router": "linear", "hidden": hidden, "ffn": ffn,
                             "layers": cfg.model.num_layers, "experts": cfg.model.num_experts, "top_k": cfg.model.top_k},
                   "batch_size": batch, "seq_len": seq_len, "expert_actors": 2, "router_workers": 1,
                   "torch_threads": 1, "lr": cfg.train.lr, "warmup_steps": warmup,
                   "steps_per_phase": steps_per_phase, "rounds": rounds,
                   "skew": {"hot_experts": list(CLUSTER_HOT), "router_gain": list(CLUSTER_ROUTER_GAIN),
                            "embed_channel": CLUSTER_SKEW_CHANNEL, "embed_const": CLUSTER_EMBED_CONST,
                            "how": "embed[:, channel] = const for every token; router.weight[hot, channel] = gain "
                                   "(every layer); pushed with RouterWorker.load_model_state after Cluster.start"}},
        "loadavg_start": list(load_start),
    }  # fmt: skip
    cluster = Cluster.start(cfg)
    try:
        out["start_s"] = time.perf_counter() - t_start
        static = cluster.placement
        out["slots_per_actor"] = cluster.scheduler.capacities(static).slots_per_actor
        dense_ref = ray.put(skewed_dense_state(cfg))
        ray.get([w.load_model_state.remote(dense_ref) for w in cluster.workers], timeout=120)
        log(f"cluster: started in {out['start_s']:.1f} s; skewed router weights loaded")

        def run(n: int) -> dict:
            _actor_tokens(cluster)  # reset the counters
            times, expert_s, losses = [], [], []
            load = np.zeros((cfg.model.num_layers, cfg.model.num_experts))
            for _ in range(n):
                rep = cluster.train_step()
                cluster.scheduler.observe(cluster, rep.step, rep.expert_load)
                times.append(rep.timings["step_s"])
                expert_s.append(rep.timings["expert_s"])
                losses.append(rep.loss)
                load += rep.expert_load.numpy()
            tokens = _actor_tokens(cluster)
            return {"placement_version": cluster.placement.version, "step_s": times, "expert_s": expert_s,
                    "losses": losses, "actor_tokens": tokens, "actor_share": _shares(tokens),
                    "expert_load": load.astype(int).tolist()}  # fmt: skip

        out["warmup"] = run(warmup)
        log(f"cluster: warm-up {warmup} steps, actor token shares {out['warmup']['actor_share']}")
        phases: dict[str, list[dict]] = {"static": [], "rebalanced": []}
        rebalanced = None
        migrations = []
        for r in range(rounds):
            if r:
                rep = cluster.rebalance(static)
                migrations.append({"to": "static", "bytes": rep.bytes_moved if rep else 0,
                                   "seconds": rep.seconds if rep else 0.0})  # fmt: skip
            phases["static"].append(run(steps_per_phase))
            if rebalanced is None:
                mig = cluster.rebalance()  # the policy's own decision from the EMA of every step so far
                d = cluster.scheduler.last_decision
                out["decision"] = {
                    "changed": d.changed, "summary": describe(d, static.version), "reason": d.reason,
                    "moves": [{"kind": m.kind, "layer": m.layer, "expert": m.expert, "src": m.src_actor,
                               "dst": m.dst_actor} for m in d.moves],
                    "bytes_to_move": d.bytes_to_move, "balancedness_before": d.balancedness_before,
                    "balancedness_after": d.balancedness_after,
                    "replica_counts": [list(row) for row in d.replica_counts],
                    "bytes_moved": mig.bytes_moved if mig else 0, "migration_s": mig.seconds if mig else None,
                }  # fmt: skip
                log(f"cluster: {out['decision']['summary']}")
                if not d.changed:
                    out["reason"] = "the policy declined to change the placement: nothing to compare"
                    break
                rebalanced = cluster.placement
                out["rebalanced_placement"] = rebalanced.to_dict()
            else:
                rep = cluster.rebalance(rebalanced)
                migrations.append({"to": "rebalanced", "bytes": rep.bytes_moved if rep else 0,
                                   "seconds": rep.seconds if rep else 0.0})  # fmt: skip
            phases["rebalanced"].append(run(steps_per_phase))
            log(f"cluster: round {r + 1}/{rounds}: static median "
                f"{np.median(phases['static'][-1]['step_s']):.3f} s, rebalanced "
                f"{np.median(phases['rebalanced'][-1]['step_s']):.3f} s")  # fmt: skip
        out["migrations_between_phases"] = migrations
        out["phases"] = phases
        for name, ps in phases.items():
            st = [s for p in ps for s in p["step_s"]]
            ex = [s for p in ps for s in p["expert_s"]]
            tok = [sum(p["actor_tokens"][a] for p in ps) for a in range(len(cluster.experts))]
            out[name] = {"steps": len(st), "step_s_median": float(np.median(st)) if st else None,
                         "step_s_mean": _mean(st), "step_s_min": min(st) if st else None,
                         "expert_s_median": float(np.median(ex)) if ex else None,
                         "actor_tokens": tok, "actor_share": _shares(tok)}  # fmt: skip
        s_med, r_med = out["static"]["step_s_median"], out["rebalanced"]["step_s_median"]
        out["static_vs_rebalanced"] = s_med / r_med if s_med and r_med else None
        # per round (each pair measured back to back): how stable the ratio is under the shared machine's load
        out["per_round_ratio"] = [float(np.median(a["step_s"]) / np.median(b["step_s"]))
                                  for a, b in zip(phases["static"], phases["rebalanced"])]  # fmt: skip
    finally:
        cluster.shutdown()
    out["loadavg_end"] = list(os.getloadavg())
    out["seconds"] = time.perf_counter() - t_start
    return out


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
    cl = result.get("cluster")
    if cl and cl.get("static_vs_rebalanced") is not None:
        st, rb = cl["static"], cl["rebalanced"]
        console.print(
            f"cluster (2 actors, skewed router): step_s median static {st['step_s_median']:.3f} s "
            f"(actor shares {[round(x, 3) for x in st['actor_share']]}) vs rebalanced {rb['step_s_median']:.3f} s "
            f"({[round(x, 3) for x in rb['actor_share']]}): ratio {cl['static_vs_rebalanced']:.3f} "
            f"(per round {[round(x, 3) for x in cl['per_round_ratio']]}); {cl['decision']['summary']}; "
            f"loadavg {cl['loadavg_start'][0]:.1f} -> {cl['loadavg_end'][0]:.1f}"
        )
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
    p.add_argument(
        "--cluster-in-quick",
        action="store_true",
        help="with --quick, also run a reduced cluster part (1 round of 3 + 3 steps; ~40 s more)",
    )
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

    cluster = None
    if args.skip_cluster:
        cluster_part, cluster_reason = "not run", "skipped (--skip-cluster)"
    elif args.quick and not args.cluster_in_quick:
        cluster_part, cluster_reason = "not run", CLUSTER_QUICK_REASON
    else:
        try:
            cluster = measure_cluster_skew(
                seed=args.seed, progress=progress, **(CLUSTER_QUICK if args.quick else {})
            )
        except Exception as err:  # noqa: BLE001  (reported in the JSON; the other parts still stand)
            cluster_part, cluster_reason = "failed", f"{type(err).__name__}: {err}"
            progress(f"cluster part failed: {cluster_reason}")
        else:
            ok = cluster.get("static_vs_rebalanced") is not None
            cluster_part = "run" if ok else "run, no comparison"
            cluster_reason = None if ok else cluster.get("reason", "no rebalanced phase was measured")
    summ = synthetic["summary"]
    result = {
        "bench": NAME,
        "balancedness_ours": summ["balancedness_ours"],
        "balancedness_eplb": summ["balancedness_eplb"],
        "bytes_moved_ours_vs_eplb": summ["bytes_moved_ours_vs_eplb"],
        "bytes_moved_ours_vs_eplb_raw": summ["bytes_moved_ours_vs_eplb_raw"],
        "goal_bytes_moved_ours_vs_eplb": 1.0,
        # median step_s static / median step_s rebalanced on the real 2-actor cluster (> 1: rebalancing helped)
        "skewed_step_time_static_vs_rebalanced": cluster["static_vs_rebalanced"] if cluster else None,
        "cluster_part": cluster_part,
        "cluster_part_reason": cluster_reason,
        "cluster": cluster,
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
            f"bytes ours/EPLB {_f(result['bytes_moved_ours_vs_eplb'])} (raw {_f(result['bytes_moved_ours_vs_eplb_raw'])}), "
            f"skewed step time static/rebalanced {_f(result['skewed_step_time_static_vs_rebalanced'])}"
        )
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
