"""ExpertShards: the state of the (layer, expert) shards one expert actor hosts; the backend its ExpertServer serves.

State (all under one lock; the server's gRPC threads call forward/backward concurrently with each other and with
the actor's control calls):
- weights: (layer, expert) -> (w1 [d, 2f], w2 [f, d]) in the storage dtype (fp32, or bf16 with
  model.expert_weight_dtype: each expert is converted to the compute dtype right before its matmuls, one at a
  time, model/weight_storage.py), the actor's own copies; weight grads (g1, g2) accumulate per shard in fp32
  buffers allocated at the first backward (a forward- or generation-only actor holds none);
- saved activations for backward, keyed by (step, micro-batch, layer, src): the fp32 inputs and the first matmul's
  output per segment. Backward pops its entry (so a replayed Backward fails instead of adding the weight grads
  twice); `end_step(step)` / `abort_step(step)` free every entry of steps <= step;
- token counters per (layer, expert) since the last reset (the scheduler's load signal);
- the placement version the shards belong to (a frame routed with another one is refused).
The weight and grad dicts are replaced whole by load / drop, never mutated, so compute reads a consistent
snapshot without holding the lock; the math is the model's (model/experts.py).

Device (`device`, a model.device.ComputeDevice, CPU fp32 by default): weights, grads and saved activations live
there and the math runs there. Requests arrive and replies leave in host memory (the codec's); `HostStaging` moves
them: one pinned host-to-device copy per frame in, one device-to-host copy into a pinned buffer out. On the CPU
both are the identity, so the CPU path runs the same calls with no copy added. Mixed precision (bf16 on CUDA):
weights and grads stay fp32 (the master copies AdamW updates), the matmuls run on bf16 casts of them, saved
activations are bf16, and the bf16 weight grads are accumulated into the fp32 buffers.

`sum_replica_grads` is the step-boundary rule that keeps replicas identical: every replica gets the same sum.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moe_runtime.dispatch.server import ActivationKey, ActivationsMissing, BackendSummary, SegmentsMismatch
from moe_runtime.model.device import CPU, ComputeDevice, HostStaging
from moe_runtime.model.experts import WeightPair, grouped_swiglu_backward, grouped_swiglu_forward_saving
from moe_runtime.model.weight_storage import ComputePairs
from moe_runtime.placement import Placement, ShardKey

__all__ = ["ExpertShards", "sum_replica_grads"]


@dataclass
class _Saved:
    experts: tuple[int, ...]
    counts: tuple[int, ...]
    x: torch.Tensor  # [rows, d] in the compute dtype, on the device, owned (never a view of a request)
    h: list[torch.Tensor]  # per segment: x_seg @ w1, [n, 2f]
    nbytes: int


def _as_shard(key: object, w: object, device: torch.device, dtype: torch.dtype) -> tuple[ShardKey, WeightPair]:
    if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, int) and k >= 0 for k in key)):
        raise ValueError(f"shard key {key!r}: expected (layer, expert) of non-negative ints")
    if not (isinstance(w, (tuple, list)) and len(w) == 2):
        raise ValueError(f"shard {key}: expected (w1 [d, 2f], w2 [f, d])")
    w1, w2 = (torch.as_tensor(t).detach().to(device, dtype, copy=True).contiguous() for t in w)
    if w1.dim() != 2 or w2.dim() != 2 or w1.shape[1] != 2 * w2.shape[0] or w2.shape[1] != w1.shape[0]:
        raise ValueError(
            f"shard {key}: w1 {list(w1.shape)}, w2 {list(w2.shape)}: expected w1 [d, 2f] and w2 [f, d]"
        )
    return (int(key[0]), int(key[1])), (w1, w2)


class ExpertShards:
    """The shards of one expert actor. Control methods (load, drop, grads, ...) run between steps; forward and
    backward are the data plane (dispatch.server.ExpertBackend)."""

    def __init__(self, shards: Mapping[ShardKey, WeightPair] | None = None, placement_version: int = 0,
                 device: ComputeDevice = CPU, storage_dtype: torch.dtype = torch.float32):  # fmt: skip
        self.device = device
        self.storage_dtype = storage_dtype  # of the weights; grads are fp32 (model.expert_weight_dtype)
        self._staging = HostStaging(device.device)
        self._lock = threading.Lock()
        self._pv = int(placement_version)
        self._weights: dict[ShardKey, WeightPair] = {}
        self._grads: dict[ShardKey, WeightPair] = {}
        self._hosted: frozenset[ShardKey] = frozenset()
        self._saved: dict[ActivationKey, _Saved] = {}
        self._tokens: dict[ShardKey, int] = {}
        self._overwritten = 0  # forwards with a key already saved (a retried or recomputed forward)
        self._steps_ended = 0
        self._steps_aborted = 0
        if shards:
            self.load(shards)

    # -------------------------------------------------------------------------------- control (between steps)

    def load(self, shards: Mapping[ShardKey, WeightPair], *, replace: bool = False) -> None:
        """Host these shards (as own copies on the device, in the storage dtype); `replace=True` drops every shard
        not in `shards`. Grads of (re)loaded shards start at zero (allocated when first needed)."""
        parsed = {}
        for k, w in shards.items():  # one shard at a time, so a load's peak is its own copies plus one input pair
            key, pair = _as_shard(k, w, self.device.device, self.storage_dtype)
            parsed[key] = pair
        with self._lock:
            weights = {} if replace else dict(self._weights)
            grads = {k: g for k, g in self._grads.items() if k in weights and k not in parsed}
            weights.update(parsed)
            self._weights, self._grads = weights, grads
            self._hosted = frozenset(weights)

    def drop(self, keys: Iterable[ShardKey]) -> None:
        with self._lock:
            keys = set(keys)
            missing = keys - set(self._weights)
            if missing:
                raise KeyError(f"drop: {sorted(missing)} not hosted")
            self._weights = {k: w for k, w in self._weights.items() if k not in keys}
            self._grads = {k: g for k, g in self._grads.items() if k not in keys}
            self._hosted = frozenset(self._weights)

    def weights(self) -> dict[ShardKey, WeightPair]:
        """The live weight tensors (the optimizer updates them in place between steps)."""
        with self._lock:
            return dict(self._weights)

    def grads(self) -> dict[ShardKey, WeightPair]:
        """The live weight-grad buffers (g1 [d, 2f], g2 [f, d], fp32) accumulated since `zero_grads`; allocates
        (zeros) those of shards that had no backward yet."""
        with self._lock:
            self._allocate_grads()
            return dict(self._grads)

    def grad_buffers_allocated(self) -> int:
        """Shards holding a grad buffer now (0 on an actor that only ran forwards)."""
        with self._lock:
            return len(self._grads)

    def _allocate_grads(self) -> None:
        """Zero fp32 grad buffers for every hosted shard without one (call under the lock). The dict is replaced,
        never mutated, like the weights."""
        missing = [k for k in self._weights if k not in self._grads]
        if missing:
            grads = dict(self._grads)
            for k in missing:
                w1, w2 = self._weights[k]
                grads[k] = (torch.zeros(w1.shape, dtype=torch.float32, device=w1.device),
                            torch.zeros(w2.shape, dtype=torch.float32, device=w2.device))
            self._grads = grads

    def set_grads(self, grads: Mapping[ShardKey, WeightPair]) -> None:
        """Overwrite the grads of hosted shards (e.g. with the sum over replicas, see `sum_replica_grads`)."""
        with self._lock:
            self._allocate_grads()
            for k, (g1, g2) in grads.items():
                if k not in self._grads:
                    raise KeyError(f"set_grads: shard {k} not hosted")
                b1, b2 = self._grads[k]
                b1.copy_(g1)
                b2.copy_(g2)

    def zero_grads(self) -> None:
        with self._lock:
            for g1, g2 in self._grads.values():
                g1.zero_()
                g2.zero_()

    @property
    def placement_version(self) -> int:
        return self._pv

    def set_placement_version(self, version: int) -> None:
        with self._lock:
            self._pv = int(version)

    def expert_token_counts(self, reset: bool = False) -> dict[ShardKey, int]:
        """Token copies served by forward per (layer, expert) since the last reset."""
        with self._lock:
            counts = dict(self._tokens)
            if reset:
                self._tokens = {}
        return counts

    def end_step(self, step: int) -> tuple[int, int]:
        """Free every saved activation of steps <= `step` (entries, bytes)."""
        return self._free(step, aborted=False)

    def abort_step(self, step: int) -> tuple[int, int]:
        """Same as end_step, for an abandoned step (counted separately in stats)."""
        return self._free(step, aborted=True)

    def _free(self, step: int, aborted: bool) -> tuple[int, int]:
        with self._lock:
            dead = [k for k in self._saved if k.step <= step]
            freed = sum(self._saved.pop(k).nbytes for k in dead)
            if aborted:
                self._steps_aborted += 1
            else:
                self._steps_ended += 1
        return len(dead), freed

    def saved_keys(self) -> list[ActivationKey]:
        """(step, micro-batch, layer, src) of every activation kept for backward."""
        with self._lock:
            return sorted(self._saved)

    def summary(self) -> BackendSummary:
        with self._lock:
            return BackendSummary(self._pv, len(self._weights), len(self._saved),
                                  sum(e.nbytes for e in self._saved.values()))  # fmt: skip

    def stats(self) -> dict[str, Any]:
        s = self.summary()
        with self._lock:
            return {
                "placement_version": s.placement_version,
                "num_shards": s.num_shards,
                "saved_entries": s.saved_entries,
                "saved_bytes": s.saved_bytes,
                "overwritten": self._overwritten,
                "steps_ended": self._steps_ended,
                "steps_aborted": self._steps_aborted,
                "grad_buffers": len(self._grads),  # shards with a grad buffer (allocated at the first backward)
                "weight_bytes": sum(w1.nbytes + w2.nbytes for w1, w2 in self._weights.values()),
                "grad_bytes": sum(g1.nbytes + g2.nbytes for g1, g2 in self._grads.values()),
            }

    # -------------------------------------------------------------------------------- data plane (ExpertBackend)

    @property
    def hosted(self) -> frozenset[ShardKey]:
        return self._hosted

    def hidden_size(self, layer: int, expert: int) -> int:
        return self._weights[(layer, expert)][0].shape[0]

    def forward(self, layer: int, experts: Sequence[int], counts: Sequence[int], x_nd: torch.Tensor,
                save_as: ActivationKey | None) -> torch.Tensor:  # fmt: skip
        weights = self._weights
        x_nd = self._staging.to_device(x_nd)  # CPU: x_nd itself
        if x_nd.dtype != self.device.dtype:  # the compare, not a no-op .to(): this is every call's path
            x_nd = x_nd.to(self.device.dtype)
        y, hs = self._compute_forward(self._compute_weights([weights[(layer, e)] for e in experts]), counts, x_nd)
        with self._lock:
            if save_as is not None:
                if save_as in self._saved:
                    self._overwritten += 1
                self._saved[save_as] = _Saved(tuple(experts), tuple(counts), x_nd, hs,
                                              x_nd.nbytes + sum(t.nbytes for t in hs))  # fmt: skip
            for e, n in zip(experts, counts):
                self._tokens[(layer, e)] = self._tokens.get((layer, e), 0) + n
        return self._staging.to_host(y)

    def backward(self, layer: int, experts: Sequence[int], counts: Sequence[int], dy_nd: torch.Tensor,
                 saved_as: ActivationKey) -> torch.Tensor:  # fmt: skip
        experts, counts = tuple(experts), tuple(counts)
        with self._lock:
            saved = self._saved.get(saved_as)
            if saved is not None and (saved.experts, saved.counts) == (experts, counts):
                del self._saved[saved_as]
        if saved is None:
            raise ActivationsMissing(saved_as)
        if (saved.experts, saved.counts) != (experts, counts):
            raise SegmentsMismatch(experts, counts, saved.experts, saved.counts)
        weights = self._weights
        dy_nd = self._staging.to_device(dy_nd).to(self.device.dtype)
        dx, wgrads = self._compute_backward(self._compute_weights([weights[(layer, e)] for e in experts]), counts,
                                            saved, dy_nd)  # fmt: skip
        with self._lock:
            self._allocate_grads()  # the first backward allocates the buffers
            for e, (dw1, dw2) in zip(experts, wgrads):
                g1, g2 = self._grads[(layer, e)]
                g1.add_(dw1)  # fp32 master grads (a bf16 dw is accumulated in fp32)
                g2.add_(dw2)
        return self._staging.to_host(dx)

    def _compute_weights(self, weights: list[WeightPair]) -> Sequence[WeightPair]:
        """The weights the matmuls use: the stored ones when they are in the compute dtype, else a lazy view that
        converts each expert right before its matmuls (mixed precision on CUDA; bf16 storage with fp32 compute)."""
        if self.storage_dtype == self.device.dtype:
            return weights
        return ComputePairs(weights, self.device.dtype)

    def _compute_forward(self, weights: list[WeightPair], counts: Sequence[int], x_nd: torch.Tensor
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
        """The expert math of forward (a benchmark overrides it with zero-FLOP experts)."""
        return grouped_swiglu_forward_saving(x_nd, counts, weights)

    def _compute_backward(self, weights: list[WeightPair], counts: Sequence[int], saved: _Saved,
                          dy_nd: torch.Tensor) -> tuple[torch.Tensor, list[WeightPair]]:  # fmt: skip
        return grouped_swiglu_backward(dy_nd, counts, saved.x, saved.h, weights)


def sum_replica_grads(grads: Sequence[Mapping[ShardKey, WeightPair]], placement: Placement,
                      keys: Iterable[ShardKey] | None = None) -> dict[ShardKey, WeightPair]:  # fmt: skip
    """Sum the weight grads of every replica of each (layer, expert) in `keys` (default: all of the placement).

    `grads[a]` is actor a's grads (what it holds of `keys`; {} for an actor with none of them);
    `placement.replicas[layer][expert]` lists the actors holding each expert. Returns (layer, expert) ->
    (sum g1, sum g2), new tensors. Protocol at the step boundary: collect the replicas' grads, sum here, set the
    sum (restricted to its shards) on every replica, then step the optimizer: replicas stay identical because
    they see the same grad.
    """
    if len(grads) != placement.num_actors:
        raise ValueError(f"got grads of {len(grads)} actors: placement has {placement.num_actors}")
    if keys is None:
        keys = [(layer, e) for layer, row in enumerate(placement.replicas) for e in range(len(row))]
    out: dict[ShardKey, WeightPair] = {}
    for layer, expert in keys:
        actors = placement.replicas[layer][expert]
        for a in actors:
            if (layer, expert) not in grads[a]:
                raise KeyError(f"actor {a} holds no grads for (layer {layer}, expert {expert})")
        first, *rest = (grads[a][(layer, expert)] for a in actors)
        # the other replicas, then the first: one fixed order, the one training has always summed in
        out[(layer, expert)] = (sum(g[0] for g in rest) + first[0], sum(g[1] for g in rest) + first[1])
    return out
