"""Decode speed: cached generation (KV / LFA caches) against full recompute, in process and on the local cluster.

Model: the `tiny` preset with max_seq_len 512 (`tiny` itself stops at 128 positions, too few for 256 new tokens;
the weights have the same shapes, only the rotary table is longer). Prompts: 8 seeded random bytes after BOS,
greedy, end-of-document ignored so every row runs to max_new_tokens. torch at 1 intra-op thread everywhere (like
every actor; a shared 2-core machine makes 2-thread torch erratic).

In process, for new tokens in (64, 256) and batch in (1, 8, 32): decode tokens/s = (new tokens - 1) x batch /
(time after the first token), cached (LocalBackend) and full recompute (RecomputeBackend: every step re-runs the
whole padded batch), their ratio, and time to first token (prefill + first sample). Cases run interleaved,
cached then recompute, best of `rounds` each, so machine drift hits both alike.

Cluster (cluster/local.yaml's layout: 4 expert actors, router workers; caches on router worker 0): decode
tokens/s at batch 1, 8, 32, against the same cached engine in process, and batch-8 over batch-1 tokens/s (the
issue's target: >= 4x, one frame per actor per layer per step whatever the batch).

Writes runs/bench/generate.json and prints it as the last stdout line.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._common import emit, make_parser, stderr_console  # noqa: E402
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
    marks: list[float] = []
    params = SamplingParams(new_tokens, temperature=0, ignore_eod=True)
    t0 = time.perf_counter()
    out = engine.generate(prompts(batch), params, on_event=lambda e: marks.append(time.perf_counter()))
    assert all(len(c.new_token_ids) == new_tokens for c in out)
    first = marks[batch - 1]  # the prefill's events: one per row
    return {"ttft_s": first - t0, "decode_tokens_per_s": (new_tokens - 1) * batch / max(marks[-1] - first, 1e-9),
            "tokens": [c.new_token_ids for c in out]}


def best_of(engine: Engine, batch: int, new_tokens: int, rounds: int) -> dict:
    runs = [time_run(engine, batch, new_tokens) for _ in range(rounds)]
    best = max(runs, key=lambda r: r["decode_tokens_per_s"])
    return {"decode_tokens_per_s": best["decode_tokens_per_s"], "ttft_s": min(r["ttft_s"] for r in runs),
            "tokens": best["tokens"]}


def in_process(cfg: RuntimeConfig, cases: list[tuple[int, int]], rounds: int, console) -> list[dict]:
    from moe_runtime.generation.backend import LocalBackend, RecomputeBackend
    from moe_runtime.model.transformer import build_model

    model = build_model(cfg.model, cfg.train.seed).eval()
    cached, full = Engine(LocalBackend(model)), Engine(RecomputeBackend(model))
    best_of(cached, 1, 8, 1)  # warm-up
    rows = []
    for new_tokens, batch in cases:
        c = best_of(cached, batch, new_tokens, rounds)
        f = best_of(full, batch, new_tokens, rounds)
        same = c.pop("tokens") == f.pop("tokens")
        ratio = c["decode_tokens_per_s"] / f["decode_tokens_per_s"]
        rows.append({"new_tokens": new_tokens, "batch": batch, "cached": c, "recompute": f,
                     "cached_vs_recompute": ratio, "same_tokens": same})
        console.print(f"in process  new {new_tokens:4d} batch {batch:3d}: cached {c['decode_tokens_per_s']:9.1f} "
                      f"tok/s (ttft {c['ttft_s'] * 1e3:6.1f} ms), recompute {f['decode_tokens_per_s']:8.1f} tok/s "
                      f"(ttft {f['ttft_s'] * 1e3:6.1f} ms): {ratio:5.2f}x, same tokens {same}")
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
        best_of(remote, 1, 8, 1)  # warm-up: connections, first frames
        rows = []
        for batch in batches:
            r = best_of(remote, batch, new_tokens, rounds)
            lo = best_of(local, batch, new_tokens, rounds)
            same = r.pop("tokens") == lo.pop("tokens")
            rows.append({"batch": batch, "new_tokens": new_tokens, "cluster": r, "in_process": lo,
                         "cluster_vs_in_process": r["decode_tokens_per_s"] / lo["decode_tokens_per_s"],
                         "same_tokens": same})
            console.print(f"cluster     new {new_tokens:4d} batch {batch:3d}: {r['decode_tokens_per_s']:9.1f} tok/s "
                          f"(ttft {r['ttft_s'] * 1e3:6.1f} ms, {1e3 * batch / r['decode_tokens_per_s']:.1f} ms/step); "
                          f"in process {lo['decode_tokens_per_s']:9.1f} tok/s; same tokens {same}")
    by_batch = {row["batch"]: row["cluster"]["decode_tokens_per_s"] for row in rows}
    out = {"rows": rows}
    if 1 in by_batch and 8 in by_batch:
        out["batch8_vs_batch1"] = by_batch[8] / by_batch[1]
        console.print(f"cluster batch 8 / batch 1 decode tokens/s: {out['batch8_vs_batch1']:.2f}x (target >= 4)")
    return out


def main() -> None:
    ap = make_parser("generate", __doc__)
    ap.add_argument("--no-cluster", action="store_true", help="in-process cases only")
    args = ap.parse_args()
    console = stderr_console()
    torch.set_num_threads(1)
    cfg = bench_config()
    if args.quick:
        cases = [(64, 1), (256, 1), (64, 8), (256, 8), (64, 32)]
        rounds, cluster_batches, cluster_tokens = 2, [1, 8, 32], 32
    else:
        cases = [(n, b) for n in (64, 256) for b in (1, 8, 32)]
        rounds, cluster_batches, cluster_tokens = 3, [1, 8, 32], 64
    rows = in_process(cfg, cases, rounds, console)
    result: dict = {"model": "tiny, max_seq_len 512", "prompt_tokens": PROMPT_LEN + 1, "torch_threads": 1,
                    "quick": args.quick, "in_process": rows}
    at256 = [r for r in rows if r["new_tokens"] == 256]
    if at256:
        result["cached_vs_recompute_256"] = {str(r["batch"]): r["cached_vs_recompute"] for r in at256}
        console.print("cached vs recompute at 256 new tokens: "
                      + ", ".join(f"batch {r['batch']} {r['cached_vs_recompute']:.2f}x" for r in at256)
                      + " (target >= 5)")
    if not args.no_cluster:
        result["cluster"] = on_cluster(cfg, cluster_batches, cluster_tokens, rounds, console)
    emit(result, args.out)


if __name__ == "__main__":
    main()
