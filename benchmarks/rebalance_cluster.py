"""Rebalancing on a real local cluster under a skewed router: step time, static vs rebalanced placement.

    python benchmarks/rebalance_cluster.py [--json] [--quick]

A real local cluster of 2 expert actors + 1 router worker, one torch thread each (tiny preset with a linear
router, hidden 128, FFN 2048, 8 experts, top-2; batch 8 x 128 tokens; lr 1e-4). After Cluster.start the
router worker gets skewed dense weights (load_model_state): a constant embedding channel read by the router
rows of experts 0 and 1, so every token's top-2 is {0, 1}, both on actor 0 under the contiguous placement (the
measured actor shares are in the JSON). Warm-up steps, then rounds of two phases (static, rebalanced), the order
alternating per round (S R | R S | S R ...: one migration per round, and neither placement always goes first):
the first switch is cluster.rebalance() (the policy decides from the tracked load and migrates live), later ones
re-apply either placement, so both are measured interleaved on the same cluster.
Reported, static / rebalanced (> 1: rebalancing helped), each over the rounds' phase medians (ratio_spread:
median, min-max, sign test, within_noise): the step time (skewed_step_time_static_vs_rebalanced, the median over
all steps as before, and skewed_step_gain) and the expert phase (StepTimings.expert_s, the slowest actor's
compute: skewed_expert_phase_static_vs_rebalanced / skewed_expert_phase_gain). second_destination_cost_s: the
data plane's cost of sending an exchange to two actors instead of one, measured directly on the same cluster
after the phases (tiny frames, fan_out to 1 vs 2 actors, interleaved: the paths a router worker takes, a
lone destination called blocking, two gathered on the shared event loop);
second_destination_cost_per_step_s: that times the step's exchanges that gained a destination; also the same
estimated from the phases' dispatch_s. The machine's load average at start and end is recorded (the cores are
shared, so absolute times vary between runs). --quick runs a reduced part (6 rounds of 3 + 3 steps) from this
script; benchmarks/rebalance.py --quick skips it unless --cluster-in-quick.

Last stdout line (and runs/bench/rebalance_cluster.json): skewed_step_time_static_vs_rebalanced,
skewed_step_gain, skewed_expert_phase_static_vs_rebalanced, skewed_expert_phase_gain, skewed_gain_note,
second_destination_cost_s, second_destination_cost_per_step_s, cluster_part
("run", "run, no comparison", "not run" or "failed"), cluster_part_reason, the detail under "cluster".
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from benchmarks._common import emit, ratio_spread
from benchmarks._rebalance_common import ScriptRun, fmt, mean_or_none

NAME = "rebalance_cluster"

CLUSTER_QUICK = {"warmup": 2, "steps_per_phase": 3, "rounds": 6, "probe_pairs": 100}
CLUSTER_QUICK_REASON = (
    "skipped under --quick: starting Ray and the 2-actor cluster takes a large share of the quick budget (see "
    "docs/measurements.md); run benchmarks/rebalance_cluster.py --quick (6 rounds of 3 + 3 steps), or without "
    "--quick, or --quick --cluster-in-quick"
)
PROBE_BLOCKS = 10  # the direct second-destination probe's pairs, in blocks: spread over block medians
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
    steps_per_phase: int = 4,
    rounds: int = 8,
    seed: int = 0,
    progress=None,
    probe_pairs: int = 300,
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
    ratio, the token share each actor actually served per phase (its Dispatch counters), the decision, the
    per-round spreads of the step and expert-phase gains, and the second-destination cost (`probe_pairs` pairs of
    tiny fan-outs to 1 and 2 actors, after the phases)."""
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
            times, expert_s, dispatch_s, losses = [], [], [], []
            load = np.zeros((cfg.model.num_layers, cfg.model.num_experts))
            for _ in range(n):
                rep = cluster.train_step()
                cluster.scheduler.observe(cluster.fleet, rep.step, rep.expert_load)
                times.append(rep.timings.step_s)
                expert_s.append(rep.timings.expert_s)
                dispatch_s.append(rep.timings.dispatch_s)
                losses.append(rep.loss)
                load += rep.expert_load.numpy()
            tokens = _actor_tokens(cluster)
            return {"placement_version": cluster.placement.version, "step_s": times, "expert_s": expert_s,
                    "dispatch_s": dispatch_s, "losses": losses, "actor_tokens": tokens, "actor_share": _shares(tokens),
                    "expert_load": load.astype(int).tolist()}  # fmt: skip

        out["warmup"] = run(warmup)
        log(f"cluster: warm-up {warmup} steps, actor token shares {out['warmup']['actor_share']}")
        phases: dict[str, list[dict]] = {"static": [], "rebalanced": []}
        rebalanced = None
        migrations = []
        current = "static"
        for r in range(rounds):
            order = ("static", "rebalanced") if r % 2 == 0 else ("rebalanced", "static")
            for name in order:
                if name != current:
                    if name == "rebalanced" and rebalanced is None:
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
                        rep = cluster.rebalance(static if name == "static" else rebalanced)
                        migrations.append({"to": name, "bytes": rep.bytes_moved if rep else 0,
                                           "seconds": rep.seconds if rep else 0.0})  # fmt: skip
                    current = name
                phases[name].append(run(steps_per_phase))
            if rebalanced is None:
                break
            log(f"cluster: round {r + 1}/{rounds} ({' then '.join(order)}): static median "
                f"{np.median(phases['static'][-1]['step_s']):.3f} s, rebalanced "
                f"{np.median(phases['rebalanced'][-1]['step_s']):.3f} s")  # fmt: skip
        if rebalanced is not None:
            out["second_destination"] = measure_second_destination(cluster, probe_pairs, rep_step=10**6)
            log(f"cluster: second destination {out['second_destination']['cost_s'] * 1e3:.3f} ms per exchange "
                f"(1 actor {out['second_destination']['one_s'] * 1e3:.3f} ms, 2 actors "
                f"{out['second_destination']['two_s'] * 1e3:.3f} ms)")
        out["migrations_between_phases"] = migrations
        out["phases"] = phases
        for name, ps in phases.items():
            st = [s for p in ps for s in p["step_s"]]
            ex = [s for p in ps for s in p["expert_s"]]
            tok = [sum(p["actor_tokens"][a] for p in ps) for a in range(len(cluster.experts))]
            out[name] = {"steps": len(st), "step_s_median": float(np.median(st)) if st else None,
                         "step_s_mean": mean_or_none(st), "step_s_min": min(st) if st else None,
                         "expert_s_median": float(np.median(ex)) if ex else None,
                         "actor_tokens": tok, "actor_share": _shares(tok)}  # fmt: skip
        s_med, r_med = out["static"]["step_s_median"], out["rebalanced"]["step_s_median"]
        out["static_vs_rebalanced"] = s_med / r_med if s_med and r_med else None
        out.update(gain_spreads(phases))
        # per round (each pair measured back to back): how stable the ratio is under the shared machine's load
        out["per_round_ratio"] = out["step_gain"]["ratios"] if out["step_gain"] else []
        if "second_destination" in out:
            out["second_destination"].update(extra_destination_cost(phases, cfg, out["second_destination"]))
    finally:
        cluster.shutdown()
    out["loadavg_end"] = list(os.getloadavg())
    out["seconds"] = time.perf_counter() - t_start
    return out


def gain_spreads(phases: dict[str, list[dict]]) -> dict:
    """static / rebalanced over the rounds (phase medians paired by round): step time and expert phase."""
    pairs = list(zip(phases["static"], phases["rebalanced"]))
    if not pairs:
        return {"step_gain": None, "expert_phase_gain": None, "expert_s_static_median": None,
                "expert_s_rebalanced_median": None}  # fmt: skip

    def medians(key: str, which: int) -> list[float]:
        return [float(np.median(p[which][key])) for p in pairs]

    return {
        "step_gain": ratio_spread(medians("step_s", 0), medians("step_s", 1)),
        "expert_phase_gain": ratio_spread(medians("expert_s", 0), medians("expert_s", 1)),
        "expert_s_static_median": float(np.median(medians("expert_s", 0))),
        "expert_s_rebalanced_median": float(np.median(medians("expert_s", 1))),
    }


def destinations_per_exchange(actor_tokens: Sequence[int]) -> int:
    """Actors an exchange of this phase went to (every actor that served tokens; the skew is stationary)."""
    return sum(1 for t in actor_tokens if t > 0)


def extra_destination_cost(phases: dict[str, list[dict]], cfg, probe: dict) -> dict:
    """The second destination's cost per step: the directly measured per-exchange cost times the exchanges that
    gained a destination, and the same estimated from the phases' dispatch_s (data-plane wall minus expert
    compute) difference."""
    m, t = cfg.model, cfg.train
    exchanges = 2 * m.num_layers * t.micro_batches * cfg.cluster.router_workers  # forward + backward per layer
    extra = [destinations_per_exchange(p["actor_tokens"]) for p in phases["rebalanced"]]
    base = [destinations_per_exchange(p["actor_tokens"]) for p in phases["static"]]
    gained = max(0, int(np.median(extra)) - int(np.median(base))) if extra and base else 0
    disp = {k: float(np.median([s for p in phases[k] for s in p["dispatch_s"]])) for k in phases if phases[k]}
    from_steps = ((disp["rebalanced"] - disp["static"]) / (gained * exchanges)
                  if gained and len(disp) == 2 else None)  # fmt: skip
    return {"exchanges_per_step": exchanges, "destinations_gained_per_exchange": gained,
            "cost_per_step_s": probe["cost_s"] * gained * exchanges,
            "dispatch_s_median": disp, "cost_from_steps_s": from_steps}  # fmt: skip


def measure_second_destination(cluster, pairs: int, rep_step: int, rows: int = 1) -> dict:
    """The data plane's cost of a second destination, on the cluster's own expert servers: `pairs` interleaved
    fan-outs of an inference Dispatch frame (`rows` rows, nothing kept) to one actor, and to two actors (the same
    frame to each: one more call), from this process, the way a router worker sends an exchange (fan_out: a lone
    destination blocking on the caller's thread, two gathered on the shared event loop). cost_s = median(two)
    - median(one); the spread is over PROBE_BLOCKS blocks of pairs."""
    import torch

    from moe_runtime.dispatch.client import ExpertClient
    from moe_runtime.dispatch.codec import encode_frame
    from moe_runtime.dispatch.fanout import ExpertCall, fan_out

    placement, layer = cluster.placement, 0
    hidden = cluster.cfg.model.hidden_size
    token = cluster._token  # the cluster's data-plane auth token (the driver holds it for its workers)
    clients = [ExpertClient(info.address, token, deadline_s=30.0) for info in cluster.actor_infos[:2]]
    try:
        calls = []
        for actor, client in enumerate(clients):
            expert = next(e for e, reps in enumerate(placement.replicas[layer]) if actor in reps)
            frame = encode_frame("dispatch", layer=layer, step=rep_step, mb=0, pv=placement.version,
                                 experts=[expert], counts=[rows], tensors={"x": torch.randn(rows, hidden)},
                                 meta={"src": 0, "save": False})  # fmt: skip
            calls.append(ExpertCall(client, "Dispatch", frame, layer, rep_step))
        for _ in range(5):  # warm both channels and the loop
            fan_out(calls[:1])
            fan_out(calls)
        one, two = [], []
        for i in range(pairs):
            for n in ((1, 2) if i % 2 == 0 else (2, 1)):
                t0 = time.perf_counter()
                fan_out(calls[:n])
                (one if n == 1 else two).append(time.perf_counter() - t0)
    finally:
        for c in clients:
            c.close()
    size = max(1, pairs // PROBE_BLOCKS)
    blocks = [(float(np.median(one[i : i + size])), float(np.median(two[i : i + size])))
              for i in range(0, pairs - size + 1, size)]  # fmt: skip
    diffs = [b - a for a, b in blocks]
    return {"pairs": pairs, "rows": rows, "one_s": float(np.median(one)), "two_s": float(np.median(two)),
            "cost_s": float(np.median(two) - np.median(one)),
            "cost_range_s": [min(diffs), max(diffs)] if diffs else None,
            "two_vs_one": ratio_spread([b for _, b in blocks], [a for a, _ in blocks]) if blocks else None}  # fmt: skip


def gain_note(step_gain: dict | None, expert_gain: dict | None) -> str | None:
    """One line on whether each gain stands out of the round-to-round noise (sign test over the rounds)."""
    if not step_gain or not expert_gain:
        return None

    def say(name: str, g: dict) -> str:
        verdict = "within noise" if g["within_noise"] else ("a gain" if g["median"] > 1 else "a loss")
        return (f"{name} {g['median']:.3f} [{g['min']:.3f}, {g['max']:.3f}] over {g['rounds']} rounds: {verdict} "
                f"(sign test p {g['sign_test_p']:.3f})")

    return "; ".join([say("expert phase static/rebalanced", expert_gain), say("step", step_gain)])


def cluster_part(quick: bool, cluster_in_quick: bool, seed: int, skip: bool = False, progress=None) -> dict:
    """Run measure_cluster_skew (or say why not): the cluster fields of rebalance.json / rebalance_cluster.json.
    A failure is reported in the fields rather than raised, so the other rebalance parts still stand."""
    cluster = None
    if skip:
        part, reason = "not run", "skipped (--skip-cluster)"
    elif quick and not cluster_in_quick:
        part, reason = "not run", CLUSTER_QUICK_REASON
    else:
        try:
            cluster = measure_cluster_skew(seed=seed, progress=progress, **(CLUSTER_QUICK if quick else {}))
        except Exception as err:  # noqa: BLE001  (reported in the JSON)
            part, reason = "failed", f"{type(err).__name__}: {err}"
            if progress:
                progress(f"cluster part failed: {reason}")
        else:
            ok = cluster.get("static_vs_rebalanced") is not None
            part = "run" if ok else "run, no comparison"
            reason = None if ok else cluster.get("reason", "no rebalanced phase was measured")
    step_gain = cluster.get("step_gain") if cluster else None
    expert_gain = cluster.get("expert_phase_gain") if cluster else None
    second = cluster.get("second_destination") if cluster else None
    return {
        # median step_s static / median step_s rebalanced on the real 2-actor cluster (> 1: rebalancing helped)
        "skewed_step_time_static_vs_rebalanced": cluster["static_vs_rebalanced"] if cluster else None,
        # static / rebalanced over the rounds' phase medians: median, min-max, sign test (ratio_spread)
        "skewed_step_gain": step_gain,
        "skewed_expert_phase_static_vs_rebalanced": expert_gain["median"] if expert_gain else None,
        "skewed_expert_phase_gain": expert_gain,
        "skewed_gain_note": gain_note(step_gain, expert_gain),
        # seconds an exchange costs going to two actors instead of one (tiny frames, measured on the cluster)
        "second_destination_cost_s": second["cost_s"] if second else None,
        "second_destination_cost_per_step_s": second.get("cost_per_step_s") if second else None,
        "cluster_part": part,
        "cluster_part_reason": reason,
        "cluster": cluster,
    }


def add_args(p) -> None:
    p.add_argument(
        "--cluster-in-quick",
        action="store_true",
        help="rebalance.py: with --quick, also run the reduced cluster part (6 rounds of 3 + 3 steps; "
        "rebalance_cluster.py --quick always runs it)",
    )


def print_summary(console, cl: dict | None) -> None:
    if not cl or cl.get("static_vs_rebalanced") is None:
        return
    st, rb = cl["static"], cl["rebalanced"]
    console.print(
        f"cluster (2 actors, skewed router): step_s median static {st['step_s_median']:.3f} s "
        f"(actor shares {[round(x, 3) for x in st['actor_share']]}) "
        f"vs rebalanced {rb['step_s_median']:.3f} s "
        f"({[round(x, 3) for x in rb['actor_share']]}): ratio {cl['static_vs_rebalanced']:.3f} "
        f"(per round {[round(x, 3) for x in cl['per_round_ratio']]}); {cl['decision']['summary']}; "
        f"{gain_note(cl['step_gain'], cl['expert_phase_gain'])}; "
        + (f"second destination {cl['second_destination']['cost_s'] * 1e3:.3f} ms per exchange; "
           if "second_destination" in cl else "") +
        f"loadavg {cl['loadavg_start'][0]:.1f} -> {cl['loadavg_end'][0]:.1f}"
    )


def main(argv: list[str] | None = None) -> dict:
    run = ScriptRun.start(NAME, __doc__.split("\n\n")[0], [add_args], argv)
    args, console = run.args, run.console
    # this script's --quick always runs the reduced cluster part (rebalance.py --quick needs --cluster-in-quick)
    part = cluster_part(args.quick, True, args.seed, progress=console.log)
    result = {"bench": NAME, **part, "quick": args.quick, **run.clock()}
    print_summary(console, part["cluster"])
    console.print(f"cluster part: {part['cluster_part']}" + (f" ({part['cluster_part_reason']})"
                  if part["cluster_part_reason"] else ""))  # fmt: skip
    if not args.json:
        ratio = fmt(part["skewed_step_time_static_vs_rebalanced"])
        print(f"{NAME}: skewed step time static/rebalanced {ratio}")
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
