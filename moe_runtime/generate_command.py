"""`moe-runtime generate` (and `forward --generate`): cached generation on the cluster or in process, tokens
streamed as they come, one summary (and with --json one object) at the end.

Prompts are text (the checkpoint's tokenizer.model, else the presets' byte tokenizer) or token ids. Several
prompts run as one continuous batch; a seed S gives prompt i the seed S + i (each request draws from its own
generator, so a prompt's tokens do not depend on the others in the batch).

`degraded` (JSON): the [layer, expert] pairs the answer was computed without (transport.on_expert_failure = mask:
experts whose every replica was down, runtime/cluster_mask.py), over every step of the call; [] when none and in
process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from moe_runtime.config import RuntimeConfig
from moe_runtime.generation.engine import Completion, Engine, TokenEvent
from moe_runtime.generation.sampling import SamplingParams


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per non-empty line."""
    try:
        lines = [ln.rstrip("\n") for ln in path.read_text(encoding="utf-8").splitlines()]
    except OSError as e:
        raise ValueError(f"--prompts-file {str(path)!r}: {e.strerror or e}") from None
    prompts = [ln for ln in lines if ln.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {str(path)!r}: no prompts (expected one per non-empty line)")
    return prompts


def per_prompt_params(n: int, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                      seed: int | None, ignore_eod: bool = False) -> list[SamplingParams]:  # fmt: skip
    return [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=None if seed is None else seed + i, ignore_eod=ignore_eod) for i in range(n)]


class TerminalStream:
    """Writes text deltas as they come: one prompt's as a plain stream; several prompts' as `[i] text` chunks."""

    def __init__(self, out: TextIO, num_prompts: int):
        self.out, self.many = out, num_prompts > 1

    def __call__(self, event: TokenEvent) -> None:
        if event.text_delta:
            self.out.write(f"[{event.request_id}] {event.text_delta!r}\n" if self.many else event.text_delta)
            self.out.flush()
        if event.completion is not None and not self.many:
            self.out.write("\n")
            self.out.flush()


@dataclass
class GenerateResult:
    completions: list[Completion]
    seconds: float
    first_token_s: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(len(c.new_token_ids) for c in self.completions)

    def to_json(self) -> dict[str, Any]:
        return {
            "new_token_ids": [c.new_token_ids for c in self.completions],
            "text": [c.text for c in self.completions],
            "finish_reason": [c.finish_reason for c in self.completions],
            "prompt_token_ids": [list(c.prompt_ids) for c in self.completions],
            "tokens_per_s": self.new_tokens / max(self.seconds, 1e-9),
            "time_to_first_token_s": self.first_token_s,
            **self.extra,
        }


def in_process_model(cfg: RuntimeConfig) -> Any:
    """The in-process model: the checkpoint's weights (cfg.model.checkpoint), else the config's seeded init."""
    if cfg.model.checkpoint is not None:
        from moe_runtime.checkpoint.hf_reader import HFCheckpoint
        from moe_runtime.checkpoint.in_process import load_model
        from moe_runtime.checkpoint.run_config import run_overrides

        return load_model(HFCheckpoint(cfg.model.checkpoint, **run_overrides(cfg.model))).eval()
    from moe_runtime.model.transformer import build_model

    return build_model(cfg.model, cfg.train.seed).eval()


def local_engine(model: Any, model_cfg: Any) -> Engine:
    """The cached engine over an in-process model, with the run's tokenizer (checkpoint's or bytes)."""
    from moe_runtime.checkpoint.text import tokenizer_for
    from moe_runtime.generation.backend import LocalBackend

    run_tok = tokenizer_for(model_cfg)
    return Engine(LocalBackend(model), run_tok.tokenizer, run_tok.eod_id)


def run_generate(
    cfg: RuntimeConfig,
    prompts: Sequence[str | Sequence[int]],
    params: Sequence[SamplingParams],
    *,
    in_process: bool,
    stream: Callable[[TokenEvent], None] | None,
    cluster: Any = None,
    model: Any = None,
    runner: Callable[[RuntimeConfig, Callable[[Any], Any]], Any] | None = None,
) -> GenerateResult:
    """Generate on `cluster` (a Cluster or the daemon's handle), in process (`model`, else cfg's), or through
    `runner(cfg, fn)` (default session.run_on_cluster: the running daemon, else a cluster started for this call).
    Text prompts go through the run's tokenizer (the checkpoint's or bytes)."""
    from moe_runtime.generation.engine import encode_prompts

    clock = {"start": time.perf_counter()}  # reset once a cluster is up: start-up is not generation time

    def on_event(e: TokenEvent) -> None:
        now = time.perf_counter()
        clock.setdefault("first", now)
        clock["last"] = now
        if stream is not None:
            stream(e)

    degraded: list[list[int]] = []

    def on(c: Any) -> list[Completion]:
        clock["start"] = time.perf_counter()
        done = c.generate(list(prompts), list(params), on_event)
        degraded[:] = degraded_of(c)
        return done

    if in_process:
        engine = local_engine(in_process_model(cfg) if model is None else model, cfg.model)
        clock["start"] = time.perf_counter()
        completions = engine.generate(encode_prompts(prompts, engine.tokenizer), list(params), on_event)
    elif cluster is None:
        from moe_runtime.runtime.session import run_on_cluster

        completions = (runner or run_on_cluster)(cfg, on)
    else:
        completions = on(cluster)
    first, last = clock.get("first"), clock.get("last")
    # decode rate: the tokens after each prompt's first one, over the time after the first token
    decode_tokens = sum(len(c.new_token_ids) - 1 for c in completions)
    rate = decode_tokens / (last - first) if first is not None and last > first else None
    return GenerateResult(completions, (last or clock["start"]) - clock["start"],
                          None if first is None else first - clock["start"],
                          {"decode_tokens_per_s": rate, "degraded": degraded})


def degraded_of(cluster: Any) -> list[list[int]]:
    """The [layer, expert] pairs the cluster's last forward or generate ran without (a Cluster, or the daemon's
    handle); [] for anything that does not mask (in process)."""
    pairs = getattr(cluster, "last_degraded", None)
    return [] if pairs is None else [[int(la), int(e)] for la, e in pairs]


def merge_degraded(*groups: Any) -> list[list[int]]:
    """Union of [layer, expert] pair lists, sorted."""
    return [list(p) for p in sorted({(int(la), int(e)) for g in groups for la, e in g})]
