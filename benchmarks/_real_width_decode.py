"""Decode speed on the real-width slice (cluster/yuan-m32-slice.yaml), cluster vs in process: the part of
`benchmarks/generate.py --real-width` (issue 14) and of `benchmarks/real_width.py` that times cached generation.

Greedy, end-of-document ignored so every row runs to the token count; decode tokens/s = (new tokens - 1) x batch /
(time after the first token), time to first token = prefill + first sample. The cluster and the in-process model
do not fit in memory together at 32 experts, so they run one after the other, each on the same prompts; the
token lists are compared (greedy: they must be equal).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SLICE = ROOT / "cluster" / "yuan-m32-slice.yaml"
PROMPT_LEN = 8


def slice_prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(100 + batch)
    return torch.randint(0, vocab, (batch, PROMPT_LEN), generator=g).tolist()


def time_decode(engine: Any, prompts: list[list[int]], new_tokens: int, reps: int) -> dict[str, Any]:
    """Greedy generation of `new_tokens` per prompt, `reps` times: decode tokens/s (median, min, max), time to
    first token (median), and the tokens."""
    from moe_runtime.generation.sampling import SamplingParams

    params = SamplingParams(new_tokens, temperature=0, ignore_eod=True)
    batch, rates, ttfts, tokens = len(prompts), [], [], None
    for _ in range(reps):
        marks: list[float] = []
        t0 = time.perf_counter()
        out = engine.generate(prompts, params, on_event=lambda e: marks.append(time.perf_counter()))
        first = marks[batch - 1]  # the prefill's events: one per row
        rates.append((new_tokens - 1) * batch / max(marks[-1] - first, 1e-9))
        ttfts.append(first - t0)
        tokens = [c.new_token_ids for c in out]
    return {"batch": batch, "new_tokens": new_tokens, "decode_tokens_per_s": statistics.median(rates),
            "decode_tokens_per_s_min": min(rates), "decode_tokens_per_s_max": max(rates),
            "ttft_s": statistics.median(ttfts), "reps": reps, "tokens": tokens}


def slice_config(quick: bool) -> dict[str, Any]:
    """The slice's config sections; quick: 4 experts instead of 32 (a 2-layer checkpoint of 0.9 GB, not 7 GB)."""
    data = yaml.safe_load(SLICE.read_text())
    if quick:
        data["model"]["num_experts"] = 4
    return data


def decode_rows(engine: Any, vocab: int, batches: list[int], new_tokens: int, reps: int) -> list[dict[str, Any]]:
    time_decode(engine, slice_prompts(1, vocab), 2, 1)  # warm-up: first touch of the caches' buffers
    return [time_decode(engine, slice_prompts(b, vocab), new_tokens, reps) for b in batches]


def compare(cluster_rows: list[dict[str, Any]], local_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for c, loc in zip(cluster_rows, local_rows):
        out.append({"batch": c["batch"], "new_tokens": c["new_tokens"],
                    "cluster_decode_tokens_per_s": c["decode_tokens_per_s"],
                    "cluster_min_max": [c["decode_tokens_per_s_min"], c["decode_tokens_per_s_max"]],
                    "in_process_decode_tokens_per_s": loc["decode_tokens_per_s"],
                    "in_process_min_max": [loc["decode_tokens_per_s_min"], loc["decode_tokens_per_s_max"]],
                    "cluster_vs_in_process": c["decode_tokens_per_s"] / loc["decode_tokens_per_s"],
                    "cluster_ttft_s": c["ttft_s"], "in_process_ttft_s": loc["ttft_s"],
                    "tokens_equal": c["tokens"] == loc["tokens"]})
    return out


def real_width_decode(quick: bool, console: Any, checkpoint: Path | None = None) -> dict[str, Any]:
    """generate.py --real-width: a random bf16 checkpoint of the slice (or `checkpoint`), decode on the cluster,
    shut it down, the same in process."""
    from moe_runtime.checkpoint.in_process import load_model
    from moe_runtime.checkpoint.run_config import resolve_checkpoint, run_overrides
    from moe_runtime.checkpoint.synthetic import write_random_checkpoint
    from moe_runtime.config import ModelConfig
    from moe_runtime.generation.backend import LocalBackend
    from moe_runtime.generation.engine import Engine
    from moe_runtime.runtime.cluster import Cluster

    data = slice_config(quick)
    batches, new_tokens, reps = ([1, 4], 8, 2) if quick else ([1, 4, 16], 16, 3)
    with tempfile.TemporaryDirectory(prefix="real_width_decode_") as tmp:
        model = ModelConfig(**data["model"])
        directory = checkpoint or write_random_checkpoint(Path(tmp) / "ck", model, dtype=torch.bfloat16,
                                                          max_shard_bytes=1 << 30)
        cfg = resolve_checkpoint(data, str(SLICE), directory)
        vocab = cfg.model.vocab_size
        with Cluster.start(cfg) as cluster:
            on_cluster = decode_rows(cluster.generation_engine(), vocab, batches, new_tokens, reps)
        with torch.no_grad():
            local = load_model(directory, **run_overrides(cfg.model)).eval()
            in_process = decode_rows(Engine(LocalBackend(local)), vocab, batches, new_tokens, reps)
    rows = compare(on_cluster, in_process)
    for r in rows:
        console.print(f"real width, batch {r['batch']}: cluster {r['cluster_decode_tokens_per_s']:.2f} tok/s, "
                      f"in process {r['in_process_decode_tokens_per_s']:.2f} tok/s "
                      f"({r['cluster_vs_in_process']:.2f}x), tokens equal: {r['tokens_equal']}")
    m = cfg.model
    return {"model": {"layers": m.num_layers, "experts": m.num_experts, "hidden": m.hidden_size,
                      "ffn": m.ffn_hidden_size, "vocab": m.vocab_size, "expert_weight_dtype": m.expert_weight_dtype},
            "prompt_tokens": PROMPT_LEN, "torch_threads": torch.get_num_threads(), "rows": rows}


__all__ = ["compare", "decode_rows", "real_width_decode", "slice_config", "slice_prompts", "time_decode"]
