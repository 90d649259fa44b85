"""Decode speed: cached generation (KV / LFA caches) against full recompute, in process and on the local cluster.

Model: the `tiny` preset with max_seq_len 512 (`tiny` itself stops at 128 positions, too few for 256 new tokens;
the weights have the same shapes, only the rotary table is longer). Prompts: 8 seeded random bytes after BOS,
greedy, end-of-document ignored so every row runs to max_new_tokens. torch at 1 intra-op thread everywhere (like
every actor; a shared 2-core machine makes 2-thread torch erratic).

In process, for new tokens in (64, 256) and batch in (1, 8, 32): decode tokens/s = (new tokens - 1) x batch /
(time after the first token), cached (LocalBackend) and full recompute (RecomputeBackend: every step re-runs the
whole padded batch), their ratio, and time to first token (prefill + first sample). Each case runs `rounds`
interleaved rounds, cached then recompute back to back, so machine drift hits both alike: a ratio is the median
of the per-round ratios with their min-max (`*_range`, `*_spread`: benchmarks/_common.ratio_spread); tokens/s is
the best round (`decode_tokens_per_s`) and the median one, with the step time (`step_ms`, median).
`cached_vs_recompute_cpu` is the same ratio in this thread's CPU time: on a loaded machine preemptions stretch
wall time unevenly, CPU time much less (in process the thread does all the work).

Cluster (cluster/local.yaml's layout: 4 expert actors, router workers; caches on router worker 0): decode
tokens/s at batch 1, 8, 32 (the batches interleaved in each round), against the same cached engine in process,
and batch-8 over batch-1 tokens/s (the issue's target: >= 4x, one frame per actor per layer per step whatever the
batch), median and min-max of the per-round ratios.

Writes runs/bench/generate.json and prints it as the last stdout line.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._common import emit, make_parser, ratio_spread, stderr_console  # noqa: E402
from moe_runtime.config import RuntimeConfig, load_config  # noqa: E402
from moe_runtime.generation.engine import Engine  # noqa: E402
from moe_runtime.generation.sampling import SamplingParams  # noqa: E402

MAX_SEQ_LEN = 512
PROMPT_LEN = 8


def bench_config() -> RuntimeConfig:
    d = load_config(ROOT / "cluster" / "local.yaml").model_dump(mode="json")
    d["model"] = {"preset": "tiny", "router": d["model"]["router"], "max_seq_len": MAX_SEQ_LEN}
    d["data"]["max_files"] = 40
    return RuntimeConfig.model_validate(d)


def prompts(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return [[256, *torch.randint(0, 256, (PROMPT_LEN,), generator=g).tolist()] for _ in range(batch)]


def time_run(engine: Engine, batch: int, new_tokens: int) -> dict:
    """One generation: time to first token, decode tokens/s after it."""
    marks: list[tuple[float, float]] = []
    params = SamplingParams(new_tokens, temperature=0, ignore_eod=True)
    t0 = time.perf_counter()
    out = engine.generate(prompts(batch), params,
                          on_event=lambda e: marks.append((time.perf_counter(), time.thread_time())))
    assert all(len(c.new_token_ids) == new_tokens for c in out)
    first = marks[batch - 1]  # the prefill's events: one per row
    tokens = (new_tokens - 1) * batch
    # cpu: this thread's CPU time only (a loaded machine's preemptions left out; in process that is all the work)
    return {"ttft_s": first[0] - t0, "decode_tokens_per_s": tokens / max(marks[-1][0] - first[0], 1e-9),
            "decode_tokens_per_cpu_s": tokens / max(marks[-1][1] - first[1], 1e-9),
            "tokens": [c.new_token_ids for c in out]}


def summary(runs: list[dict], batch: int) -> dict:
    """Rounds of one engine on one case: best and median decode tokens/s, the median step time, best ttft."""
    tps = sorted(r["decode_tokens_per_s"] for r in runs)
    median = tps[len(tps) // 2] if len(tps) % 2 else (tps[len(tps) // 2 - 1] + tps[len(tps) // 2]) / 2
    return {"decode_tokens_per_s": tps[-1], "decode_tokens_per_s_median": median,
            "step_ms": 1e3 * batch / median, "ttft_s": min(r["ttft_s"] for r in runs)}


def spread_fields(name: str, a_runs: list[dict], b_runs: list[dict], key: str = "decode_tokens_per_s") -> dict:
    """`name` (median of the per-round ratios a/b of `key`), `name`_range [min, max], `name`_spread."""
    sp = ratio_spread([r[key] for r in a_runs], [r[key] for r in b_runs])
    return {name: sp["median"], f"{name}_range": [sp["min"], sp["max"]], f"{name}_spread": sp}


def in_process(cfg: RuntimeConfig, cases: list[tuple[int, int, int]], console) -> list[dict]:
    """cases: (new tokens, batch, rounds)."""
    from moe_runtime.generation.backend import LocalBackend, RecomputeBackend
    from moe_runtime.model.transformer import build_model

    model = build_model(cfg.model, cfg.train.seed).eval()
    cached, full = Engine(LocalBackend(model)), Engine(RecomputeBackend(model))
    time_run(cached, 1, 8)  # warm-up
    time_run(full, 1, 8)
    rows = []
    for new_tokens, batch, rounds in cases:
        c_runs, f_runs = [], []
        for _ in range(rounds):  # interleaved: a load spike hits one pair of runs, not one engine's whole case
            c_runs.append(time_run(cached, batch, new_tokens))
            f_runs.append(time_run(full, batch, new_tokens))
        same = all(r["tokens"] == c_runs[0]["tokens"] for r in c_runs + f_runs)
        c, f = summary(c_runs, batch), summary(f_runs, batch)
        row = {"new_tokens": new_tokens, "batch": batch, "rounds": rounds, "cached": c, "recompute": f,
               **spread_fields("cached_vs_recompute", c_runs, f_runs),
               **spread_fields("cached_vs_recompute_cpu", c_runs, f_runs, "decode_tokens_per_cpu_s"),
               "cached_vs_recompute_best": c["decode_tokens_per_s"] / f["decode_tokens_per_s"], "same_tokens": same}
        rows.append(row)
        lo, hi = row["cached_vs_recompute_range"]
        console.print(f"in process  new {new_tokens:4d} batch {batch:3d}: cached {c['decode_tokens_per_s']:9.1f} "
                      f"tok/s ({c['step_ms']:.3f} ms/step, ttft {c['ttft_s'] * 1e3:5.1f} ms), recompute "
                      f"{f['decode_tokens_per_s']:8.1f} tok/s: {row['cached_vs_recompute']:5.2f}x "
                      f"[{lo:.2f}-{hi:.2f}] over {rounds} rounds (cpu time: {row['cached_vs_recompute_cpu']:.2f}x), "
                      f"same tokens {same}")
    return rows


def on_cluster(cfg: RuntimeConfig, batches: list[int], new_tokens: int, rounds: int, console) -> dict:
    from moe_runtime.generation.backend import LocalBackend
    from moe_runtime.model.transformer import build_model
    from moe_runtime.runtime.cluster import Cluster

    local = Engine(LocalBackend(build_model(cfg.model, cfg.train.seed).eval()))
    t0 = time.perf_counter()
    with Cluster.start(cfg) as cluster:
        console.print(f"cluster up in {time.perf_counter() - t0:.1f} s")
        remote = cluster.generation_engine()
        time_run(remote, 1, 8)  # warm-up: connections, first frames
        time_run(remote, 8, 8)
        r_runs: dict[int, list[dict]] = {b: [] for b in batches}
        l_runs: dict[int, list[dict]] = {b: [] for b in batches}
        for _ in range(rounds):  # the batches interleaved in every round: the batch ratios are paired
            for batch in batches:
                r_runs[batch].append(time_run(remote, batch, new_tokens))
                l_runs[batch].append(time_run(local, batch, new_tokens))
        rows = []
        for batch in batches:
            r, lo = summary(r_runs[batch], batch), summary(l_runs[batch], batch)
            same = all(x["tokens"] == l_runs[batch][0]["tokens"] for x in r_runs[batch] + l_runs[batch])
            rows.append({"batch": batch, "new_tokens": new_tokens, "rounds": rounds, "cluster": r, "in_process": lo,
                         **spread_fields("cluster_vs_in_process", r_runs[batch], l_runs[batch]),
                         "same_tokens": same})
            console.print(f"cluster     new {new_tokens:4d} batch {batch:3d}: {r['decode_tokens_per_s']:9.1f} tok/s "
                          f"(ttft {r['ttft_s'] * 1e3:6.1f} ms, {r['step_ms']:.1f} ms/step median); "
                          f"in process {lo['decode_tokens_per_s']:9.1f} tok/s; same tokens {same}")
    out: dict = {"rows": rows}
    if 1 in r_runs and 8 in r_runs:
        out.update(spread_fields("batch8_vs_batch1", r_runs[8], r_runs[1]))
        lo, hi = out["batch8_vs_batch1_range"]
        console.print(f"cluster batch 8 / batch 1 decode tokens/s: {out['batch8_vs_batch1']:.2f}x median, "
                      f"[{lo:.2f}-{hi:.2f}] over {rounds} rounds (target >= 4)")
    return out


def main() -> None:
    ap = make_parser("generate", __doc__)
    ap.add_argument("--no-cluster", action="store_true", help="in-process cases only")
    ap.add_argument("--real-width", action="store_true",
                    help="decode on the real-width slice instead (cluster/yuan-m32-slice.yaml; --quick: 4 experts)")
    args = ap.parse_args()
    console = stderr_console()
    if args.real_width:  # issue 14 "on the real-width slice too": benchmarks/_real_width_decode.py
        from benchmarks._real_width_decode import real_width_decode

        out = args.out.with_name("generate_real_width.json") if args.out.name == "generate.json" else args.out
        emit(real_width_decode(args.quick, console), out)
        return
    torch.set_num_threads(1)
    cfg = bench_config()
    if args.quick:  # (new tokens, batch, rounds): the long recomputes (batch 8 and 32) get fewer rounds; 256 x 8
        # (a third of the quick run; its ratio ~12x against the target 5, spread ~10%) two
        cases = [(64, 1, 5), (256, 1, 5), (64, 8, 3), (256, 8, 2), (64, 32, 3)]
        cluster_rounds, cluster_batches, cluster_tokens = 5, [1, 8, 32], 32
    else:
        cases = [(n, b, 7 if b == 1 else 5) for n in (64, 256) for b in (1, 8, 32)]
        cluster_rounds, cluster_batches, cluster_tokens = 7, [1, 8, 32], 64
    rows = in_process(cfg, cases, console)
    result: dict = {"model": "tiny, max_seq_len 512", "prompt_tokens": PROMPT_LEN + 1, "torch_threads": 1,
                    "quick": args.quick, "load_average": list(os.getloadavg()), "in_process": rows}
    at256 = [r for r in rows if r["new_tokens"] == 256]
    if at256:
        result["cached_vs_recompute_256"] = {str(r["batch"]): r["cached_vs_recompute"] for r in at256}
        result["cached_vs_recompute_256_range"] = {str(r["batch"]): r["cached_vs_recompute_range"] for r in at256}
        result["cached_step_ms_256"] = {str(r["batch"]): r["cached"]["step_ms"] for r in at256}
        result["cached_vs_recompute_256_cpu"] = {str(r["batch"]): r["cached_vs_recompute_cpu"] for r in at256}
        console.print("cached vs recompute at 256 new tokens (median, min-max over rounds): "
                      + ", ".join(f"batch {r['batch']} {r['cached_vs_recompute']:.2f}x "
                                  f"[{r['cached_vs_recompute_range'][0]:.2f}-{r['cached_vs_recompute_range'][1]:.2f}]"
                                  for r in at256)
                      + " (target >= 5)")
    if not args.no_cluster:
        result["cluster"] = on_cluster(cfg, cluster_batches, cluster_tokens, cluster_rounds, console)
    result["load_average_end"] = list(os.getloadavg())
    emit(result, args.out)


if __name__ == "__main__":
    main()
