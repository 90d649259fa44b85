"""The router worker's side of cached generation: decoding caches kept in the worker, keyed by integer handles.

The driver's RemoteBackend (generation_backend.py) holds only handles; each call here runs the worker's model
(its MoE layers dispatch to the expert actors through RemoteDispatchers) with an inference StepContext, so the
expert servers keep nothing for backward. A decode step of B rows is one cached forward: one frame per expert
actor per MoE layer, whatever B.

Row selection is folded into the next call (`rows` arguments): dropping finished rows costs no call of its own.
Handles are consumed by the call that uses them (decode keeps its handle); `stats` counts what is held, so a test
can see that nothing leaks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moe_runtime.generation.backend import LocalBackend
from moe_runtime.model.attention import KVCache
from moe_runtime.model.transformer import MoETransformer


class CacheHost:
    def __init__(self, model: MoETransformer, backend: LocalBackend | None = None):
        self.backend = backend or LocalBackend(model)  # the worker's: runs under its expert mask (expert_mask.py)
        self._caches: dict[int, KVCache] = {}
        self._next = 0

    def _put(self, cache: KVCache) -> int:
        self._next += 1
        self._caches[self._next] = cache
        return self._next

    def _take(self, handle: int, rows: Sequence[int] | None) -> KVCache:
        """The cache under handle (removed), narrowed to `rows` when given."""
        cache = self._caches.pop(handle, None)
        if cache is None:
            raise KeyError(f"generation cache handle {handle}: unknown (already consumed or freed)")
        return cache if rows is None else self.backend.keep(cache, rows)

    def prefill(self, prompts: Sequence[Sequence[int]], capacity: int) -> tuple[int, torch.Tensor]:
        cache, logits_nv = self.backend.prefill(prompts, capacity)
        return self._put(cache), logits_nv

    def decode(self, handle: int, rows: Sequence[int] | None, tokens: Sequence[int]) -> tuple[int, torch.Tensor]:
        """Narrow the cache to rows (None: all), append one token per row; (the new handle, logits [B, V])."""
        cache = self._take(handle, rows)  # a failed step (e.g. a dead expert) frees the cache: nothing leaks
        logits_bv = self.backend.decode(cache, tokens)
        return self._put(cache), logits_bv

    def join(self, first: int, first_rows: Sequence[int] | None, second: int,
             second_rows: Sequence[int] | None) -> int:  # fmt: skip
        a, b = self._take(first, first_rows), self._take(second, second_rows)
        return self._put(self.backend.join(a, b))

    def free(self, handles: Sequence[int]) -> int:
        """Drop these caches (unknown handles are ignored); returns how many were held."""
        return sum(self._caches.pop(int(h), None) is not None for h in handles)

    def stats(self) -> dict[str, Any]:
        rows = sum(c.batch_size for c in self._caches.values())
        nbytes = sum(t.numel() * t.element_size() for c in self._caches.values() for layer in c.layers
                     for t in (layer.k_bhcd, layer.v_bhcd, layer.lfa_inputs_b2d) if t is not None)
        return {"caches": len(self._caches), "rows": rows, "bytes": nbytes, "forwards": self.backend.forwards}

    def call(self, op: str, *args: Any) -> Any:
        if op not in ("prefill", "decode", "join", "free", "stats"):
            raise ValueError(f"generation op = {op!r}: expected prefill, decode, join, free or stats")
        return getattr(self, op)(*args)
