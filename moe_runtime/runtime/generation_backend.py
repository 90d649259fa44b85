"""RemoteBackend: the generation engine's DecodeBackend over a router worker of the cluster.

The caches live in the worker (generation_host.CacheHost), the driver holds `RemoteCache` handles. One decode
step of the whole running batch is one Ray call to that worker, which runs one cached forward: one frame per
expert actor per MoE layer, whatever the batch. The running batch stays on one worker on purpose: splitting it
over workers would send every actor one frame per worker per layer.

`keep` costs no call: it records the rows on the handle and the next decode or join narrows the cache first;
`keep(cache, [])` frees it (fire and forget). Logits come back as float32 [B, V] on the CPU, so sampling on the
driver is the same code, with the same seeded generators, as in process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moe_runtime.config import ModelConfig
from moe_runtime.runtime.calls import CONTROL_TIMEOUT_S, get_within


@dataclass(eq=False)
class RemoteCache:
    """A cache of `size` rows held by the worker under `handle`; `rows` (None: all, in order) are the live ones.
    Decode replaces the handle in place (the worker consumes the old one)."""

    handle: int
    size: int
    rows: tuple[int, ...] | None = None

    @property
    def batch_size(self) -> int:
        return self.size if self.rows is None else len(self.rows)


class RemoteBackend:
    def __init__(self, worker: Any, model: ModelConfig, timeout_s: float = CONTROL_TIMEOUT_S):
        """worker: a RouterWorker actor handle (its `generation` method); model: the model it runs."""
        self.worker = worker
        self.vocab_size = model.vocab_size
        self.max_seq_len = model.max_seq_len
        self.timeout_s = timeout_s
        self.calls = 0  # Ray calls made (prefill, decode, join): what a step costs on the control path

    def _call(self, op: str, *args: Any) -> Any:
        self.calls += 1
        return get_within(self.worker.generation.remote(op, *args), self.timeout_s, f"generation {op}")

    def prefill(self, prompts: Sequence[Sequence[int]], capacity: int) -> tuple[RemoteCache, torch.Tensor]:
        handle, logits_nv = self._call("prefill", [list(map(int, p)) for p in prompts], int(capacity))
        return RemoteCache(handle, len(prompts)), logits_nv

    def decode(self, cache: RemoteCache, tokens: Sequence[int]) -> torch.Tensor:
        if len(tokens) != cache.batch_size:
            raise ValueError(f"{len(tokens)} tokens for a cache of {cache.batch_size} rows")
        cache.handle, logits_bv = self._call("decode", cache.handle, cache.rows, [int(t) for t in tokens])
        cache.size, cache.rows = len(tokens), None
        return logits_bv

    def keep(self, cache: RemoteCache, rows: Sequence[int]) -> RemoteCache | None:
        rows = [int(r) for r in rows]
        if not rows:
            self.worker.generation.remote("free", [cache.handle])  # nothing waits for it
            return None
        if max(rows) >= cache.batch_size or min(rows) < 0:
            raise ValueError(f"rows = {rows}: the cache has rows 0..{cache.batch_size - 1}")
        base = range(cache.size) if cache.rows is None else cache.rows
        picked = tuple(base[r] for r in rows)
        return RemoteCache(cache.handle, cache.size, None if picked == tuple(range(cache.size)) else picked)

    def join(self, first: RemoteCache, second: RemoteCache) -> RemoteCache:
        handle = self._call("join", first.handle, first.rows, second.handle, second.rows)
        return RemoteCache(handle, first.batch_size + second.batch_size)

    def stats(self) -> dict[str, Any]:
        """What the worker holds: caches, rows, bytes, forwards run."""
        return self._call("stats")

