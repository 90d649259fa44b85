"""RemoteBackend: the generation engine's DecodeBackend over a router worker of the cluster.

The caches live in the worker (generation_host.CacheHost), the driver holds `RemoteCache` handles. One decode
step of the whole running batch is one Ray call to that worker, which runs one cached forward: one frame per
expert actor per MoE layer, whatever the batch. The running batch stays on one worker on purpose: splitting it
over workers would send every actor one frame per worker per layer.

`keep` costs no call: it records the rows on the handle and the next decode or join narrows the cache first;
`keep(cache, [])` frees it (fire and forget). Logits come back as float32 [B, V] on the CPU, so sampling on the
driver is the same code, with the same seeded generators, as in process.

Failover: each handle also keeps its rows' token histories (prompt + tokens decoded), a few ints per token on the
driver. When the caches' worker dies, hangs or has restarted without its weights, the backend moves to the next
worker it was given and rebuilds each cache there by one prefill of those histories when the cache is next used: a
decode step's logits are then the prefill's last-position logits (equal to the cached ones up to fp32 rounding).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch

from moe_runtime.config import ModelConfig
from moe_runtime.runtime.calls import CONTROL_TIMEOUT_S, get_within

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(eq=False)
class RemoteCache:
    """A cache of `size` rows held by the worker under `handle`; `rows` (None: all, in order) are the live ones.
    Decode replaces the handle in place (the worker consumes the old one). `history[slot]`: the tokens in that slot
    (to rebuild the cache elsewhere), `capacity` its positions, `epoch` the backend's worker it lives on."""

    handle: int
    size: int
    rows: tuple[int, ...] | None = None
    history: list[list[int]] = field(default_factory=list)
    capacity: int = 0
    epoch: int = 0

    @property
    def batch_size(self) -> int:
        return self.size if self.rows is None else len(self.rows)

    def live_history(self) -> list[list[int]]:
        return list(self.history) if self.rows is None else [self.history[r] for r in self.rows]


def worker_lost(err: BaseException) -> bool:
    """The caches' worker is gone (nodes.worker_failure: died, restarting, restarted without its weights) or gave no
    answer in time. Expert failures inside a healthy worker are not this (they propagate)."""
    import ray.exceptions as rex

    from moe_runtime.runtime.nodes import worker_failure

    return isinstance(err, rex.GetTimeoutError) or worker_failure(err)


class RemoteBackend:
    def __init__(self, worker: Any, model: ModelConfig, timeout_s: float = CONTROL_TIMEOUT_S,
                 spares: Sequence[Any] = ()):  # fmt: skip
        """worker: a RouterWorker actor handle (its `generation` method); model: the model it runs; spares: workers
        to move the caches to, in order, if `worker` is lost."""
        self.worker = worker
        self.spares = list(spares)
        self.vocab_size = model.vocab_size
        self.max_seq_len = model.max_seq_len
        self.timeout_s = timeout_s
        self.calls = 0  # Ray calls made (prefill, decode, join): what a step costs on the control path
        self.epoch = 0  # bumped at each failover: caches of an older epoch are rebuilt before use
        self.failovers = 0

    def _guarded(self, fn: Callable[[], T]) -> T:
        """fn(), and on a lost worker fn() again on the next spare (fn rebuilds stale caches itself)."""
        while True:
            try:
                return fn()
            except BaseException as err:
                if not worker_lost(err) or not self.spares:
                    raise
                log.warning("generation: router worker lost (%s); moving the caches to the next one", err)
                self.worker = self.spares.pop(0)
                self.epoch += 1
                self.failovers += 1

    def _fresh(self, cache: RemoteCache) -> RemoteCache:
        """`cache` on the current worker: itself, or rebuilt there from its live rows' histories."""
        if cache.epoch == self.epoch:
            return cache
        history = cache.live_history()
        handle, _ = self._call("prefill", history, cache.capacity)
        return RemoteCache(handle, len(history), None, history, cache.capacity, self.epoch)

    def _call(self, op: str, *args: Any) -> Any:
        self.calls += 1
        return get_within(self.worker.generation.remote(op, *args), self.timeout_s, f"generation {op}")

    def prefill(self, prompts: Sequence[Sequence[int]], capacity: int) -> tuple[RemoteCache, torch.Tensor]:
        rows = [list(map(int, p)) for p in prompts]

        def run() -> tuple[RemoteCache, torch.Tensor]:
            handle, logits_nv = self._call("prefill", rows, int(capacity))
            return RemoteCache(handle, len(rows), None, rows, int(capacity), self.epoch), logits_nv

        return self._guarded(run)

    def decode(self, cache: RemoteCache, tokens: Sequence[int]) -> torch.Tensor:
        if len(tokens) != cache.batch_size:
            raise ValueError(f"{len(tokens)} tokens for a cache of {cache.batch_size} rows")
        tokens = [int(t) for t in tokens]
        history = [h + [t] for h, t in zip(cache.live_history(), tokens)]

        def run() -> torch.Tensor:
            if cache.epoch != self.epoch:  # rebuilt here: the prefill of the histories gives this step's logits
                cache.handle, logits_bv = self._call("prefill", history, cache.capacity)
            else:
                cache.handle, logits_bv = self._call("decode", cache.handle, cache.rows, tokens)
            cache.epoch = self.epoch
            return logits_bv

        logits_bv = self._guarded(run)
        cache.size, cache.rows, cache.history = len(tokens), None, history
        return logits_bv

    def keep(self, cache: RemoteCache, rows: Sequence[int]) -> RemoteCache | None:
        rows = [int(r) for r in rows]
        if not rows:
            if cache.epoch == self.epoch:
                self.worker.generation.remote("free", [cache.handle])  # nothing waits for it
            return None
        if max(rows) >= cache.batch_size or min(rows) < 0:
            raise ValueError(f"rows = {rows}: the cache has rows 0..{cache.batch_size - 1}")
        base = range(cache.size) if cache.rows is None else cache.rows
        picked = tuple(base[r] for r in rows)
        return RemoteCache(cache.handle, cache.size, None if picked == tuple(range(cache.size)) else picked,
                           cache.history, cache.capacity, cache.epoch)  # fmt: skip

    def join(self, first: RemoteCache, second: RemoteCache) -> RemoteCache:
        def run() -> RemoteCache:
            a, b = self._fresh(first), self._fresh(second)
            handle = self._call("join", a.handle, a.rows, b.handle, b.rows)
            return RemoteCache(handle, a.batch_size + b.batch_size, None, a.live_history() + b.live_history(),
                               max(a.capacity, b.capacity), self.epoch)  # fmt: skip

        return self._guarded(run)

    def stats(self) -> dict[str, Any]:
        """What the worker holds: caches, rows, bytes, forwards run."""
        return self._call("stats")

