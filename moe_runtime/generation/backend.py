"""Where the engine's model runs and its decoding caches live.

`DecodeBackend` is the seam: `LocalBackend` runs a MoETransformer in this process with KV / LFA caches (its MoE
layers may still dispatch to remote experts); a cluster backend keeps the same caches in a router worker and
returns handles. `RecomputeBackend` re-runs the whole sequence every step: the oracle (and the baseline) that
cached decoding must match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from moe_runtime.model.attention import KVCache
from moe_runtime.model.moe_layer import StepContext
from moe_runtime.model.transformer import MoETransformer


class DecodeBackend(Protocol):
    """Runs the model for the engine and owns the per-row decoding state ("cache", opaque to the engine).

    Logits come back as float32 on the CPU (rows in cache order), so sampling is the same wherever the model
    runs. `keep` and `join` consume the caches they are given; `keep(cache, [])` frees it and returns None.
    """

    vocab_size: int
    max_seq_len: int

    def prefill(self, prompts: Sequence[Sequence[int]], capacity: int) -> tuple[Any, torch.Tensor]:
        """A cache holding the prompts (one row each) with room for `capacity` tokens per row, and the logits
        [n, V] after each prompt's last token."""
        ...

    def decode(self, cache: Any, tokens: Sequence[int]) -> torch.Tensor:
        """Append one token per row; the logits [B, V] after it."""
        ...

    def keep(self, cache: Any, rows: Sequence[int]) -> Any:
        """The cache of these rows only, in this order."""
        ...

    def join(self, first: Any, second: Any) -> Any:
        """One cache with first's rows, then second's."""
        ...


def pad_right(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [n, max len] (each row left-aligned, padded with pad_id) and the lengths [n] (long)."""
    lengths = [len(r) for r in rows]
    tokens = torch.full((len(rows), max(lengths)), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return tokens, torch.tensor(lengths, dtype=torch.long)


def _host_fp32(logits: torch.Tensor) -> torch.Tensor:
    """logits as float32 on the CPU (no-op dispatches skipped: a decode step is per-op overhead)."""
    if logits.dtype != torch.float32:
        logits = logits.float()
    return logits if logits.device.type == "cpu" else logits.cpu()


class LocalBackend:
    """A MoETransformer in this process with its caches (KVCache) here too: prefill and decode are cached
    forwards through the model's own MoE layers and dispatchers. Every forward passes an inference StepContext
    numbered by this backend's forwards (remote dispatchers need one; nothing is kept for backward)."""

    def __init__(self, model: MoETransformer):
        self.model = model
        self.vocab_size = model.cfg.vocab_size
        self.max_seq_len = model.cfg.max_seq_len
        self.forwards = 0  # prefill and decode forwards run so far: the inference StepContext's step

    def _ctx(self) -> StepContext:
        self.forwards += 1
        return StepContext.for_inference(self.forwards - 1)

    @property
    def _device(self) -> torch.device:  # by dict: nn.Module attribute misses cost ~5k instructions each, per step
        return self.model._modules["embed"]._parameters["weight"].device

    @torch.inference_mode()  # no autograd bookkeeping at all: a decode step is many small ops
    def prefill(self, prompts: Sequence[Sequence[int]], capacity: int) -> tuple[KVCache, torch.Tensor]:
        tokens_bs, lengths_b = pad_right(prompts)
        cache = self.model.new_cache(len(prompts), capacity)
        out = self.model(tokens_bs.to(self._device), self._ctx(), cache=cache, num_new=lengths_b,
                         last_logits_only=True)
        return cache, _host_fp32(out.logits[:, 0])

    @torch.inference_mode()  # no autograd bookkeeping at all: a decode step is many small ops
    def decode(self, cache: KVCache, tokens: Sequence[int]) -> torch.Tensor:
        tokens_b1 = torch.tensor([[int(t)] for t in tokens], dtype=torch.long, device=self._device)
        logits_b1v = self.model(tokens_b1, self._ctx(), cache=cache, last_logits_only=True).logits
        return _host_fp32(logits_b1v.select(1, 0))  # select: logits[:, 0] without __getitem__'s parsing

    @torch.inference_mode()
    def keep(self, cache: KVCache, rows: Sequence[int]) -> KVCache | None:
        if not rows:
            return None
        return cache if list(rows) == list(range(cache.batch_size)) else cache.select(rows)

    @torch.inference_mode()
    def join(self, first: KVCache, second: KVCache) -> KVCache:
        return KVCache.concat([first, second])


class RecomputeBackend:
    """No cache: every step runs the whole padded batch of sequences again (the oracle and the baseline).
    Its "cache" is each row's token list."""

    def __init__(self, model: MoETransformer):
        self.model = model
        self.vocab_size = model.cfg.vocab_size
        self.max_seq_len = model.cfg.max_seq_len

    @torch.inference_mode()  # no autograd bookkeeping at all: a decode step is many small ops
    def _last_logits(self, rows: list[list[int]]) -> torch.Tensor:
        tokens_bs, lengths_b = pad_right(rows)
        logits_bsv = self.model(tokens_bs.to(self.model.embed.weight.device)).logits
        return logits_bsv[torch.arange(len(rows)), lengths_b.to(logits_bsv.device) - 1].float().cpu()

    def prefill(self, prompts: Sequence[Sequence[int]], capacity: int) -> tuple[list[list[int]], torch.Tensor]:
        rows = [list(p) for p in prompts]
        return rows, self._last_logits(rows)

    def decode(self, cache: list[list[int]], tokens: Sequence[int]) -> torch.Tensor:
        for row, t in zip(cache, tokens, strict=True):
            row.append(int(t))
        return self._last_logits(cache)

    def keep(self, cache: list[list[int]], rows: Sequence[int]) -> list[list[int]] | None:
        return [cache[i] for i in rows] or None

    def join(self, first: list[list[int]], second: list[list[int]]) -> list[list[int]]:
        return first + second
