"""Expert weights stored in one dtype, computed in another (`model.expert_weight_dtype`).

On this CPU bf16 matmuls are 60-500x slower than fp32 (shared machine-notes), but bf16 storage halves the experts'
memory (a real-width expert: 201 MB in fp32, 101 MB in bf16). So the weights stay in the storage dtype and each
expert is converted to the compute dtype right before its matmuls, one expert at a time: at most two converted
experts are alive at once (the one computing and the previous one being freed), never a whole layer.

Used by the in-process experts (model/experts.py SwiGLUExperts, LocalDispatcher) and the expert actors' shards
(runtime/expert_shards.py), so the cluster and its oracle compute the same numbers from the same stored bits.
Training keeps fp32 storage: AdamW's master weights must be fp32 (`check_trainable`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from moe_runtime.config import ModelConfig

WeightPair = tuple[torch.Tensor, torch.Tensor]  # (w1 [d, 2f], w2 [f, d]) of one expert

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def expert_storage_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype the expert weights are kept in (model.expert_weight_dtype)."""
    return _DTYPES[cfg.expert_weight_dtype]


def check_trainable(cfg: ModelConfig) -> None:
    """Training needs fp32 master weights: a clear error for bf16-stored experts."""
    if cfg.expert_weight_dtype != "float32":
        raise ValueError(f"model.expert_weight_dtype = {cfg.expert_weight_dtype!r}: bf16-stored experts are for "
                         "forward and generation only; training needs 'float32' (AdamW updates fp32 master weights)")


class ComputePairs(Sequence[WeightPair]):
    """A lazy view of stored weight pairs in the compute dtype: item i is converted when it is read (the identity,
    no copy, when the dtypes already agree). Iterating converts one expert at a time."""

    def __init__(self, stored: Sequence[WeightPair], dtype: torch.dtype):
        self._stored = stored
        self._dtype = dtype

    def __len__(self) -> int:
        return len(self._stored)

    def __getitem__(self, i: int) -> WeightPair:  # type: ignore[override]
        w1, w2 = self._stored[i]
        return w1.to(self._dtype), w2.to(self._dtype)

    def __iter__(self) -> Iterator[WeightPair]:
        for i in range(len(self._stored)):
            yield self[i]


def stored_swiglu_loop(x_nd: torch.Tensor, counts: Sequence[int], w1_ed2f: torch.Tensor, w2_efd: torch.Tensor,
                       weight_index: Sequence[int] | None = None) -> torch.Tensor:
    """grouped_swiglu over stacked weights stored in another dtype than x: a loop over the non-empty segments,
    each expert converted to x's dtype right before its matmuls (the loop path's ops, so it equals the expert
    actors' grouped_swiglu_forward_saving on the same converted weights)."""
    from moe_runtime.model.experts import swiglu

    if sum(counts) != x_nd.shape[0]:
        raise ValueError(f"counts sum to {sum(counts)}: expected x rows ({x_nd.shape[0]})")
    index = range(len(counts)) if weight_index is None else weight_index
    dt = x_nd.dtype
    out = x_nd.new_empty(x_nd.shape[0], w2_efd.shape[-1])
    start = 0
    for e, n in zip(index, counts):
        if n:
            e = int(e)
            out[start : start + n] = swiglu(x_nd[start : start + n], w1_ed2f[e].to(dt), w2_efd[e].to(dt))
        start += n
    return out


__all__ = ["ComputePairs", "check_trainable", "expert_storage_dtype", "stored_swiglu_loop"]
