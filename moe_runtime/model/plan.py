"""DispatchPlan: top-k expert ids + placement -> token copies sorted by (actor, expert), a frozen handle.

The plan is everything the data path needs to move tokens and put the results back:
- `order[n]`: which flattened (token, slot) copy sits at sorted position n;
- `token_index[n] = order[n] // k`: the token it came from (for gather and combine);
- `segments`: contiguous runs of the sorted copies with one (actor, expert) each, sorted by (actor, expert).
A replicated expert's copies are split evenly across its replicas, in token order, so the split is deterministic
and each replica gets n // R (+1) rows: the load model the scheduler assumes.

Variable copies per token (top-p routing): ids padded to [T, k_max] with a mask of the real slots; only real
slots become copies (`num_copies` <= T*k_max) and `order` still indexes the flattened [T*k_max] slots, so gather
and combine are unchanged. Without a mask the plan is exactly the fixed top-k one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from itertools import groupby

import torch

from moe_runtime.placement import Placement, split_over_replicas


# Up to this many token copies (T*k) a plan is built from Python lists (`_build_small`): a decode step's tokens.
SMALL_PLAN_COPIES = 16


def _expert_offsets(expert_counts: list[int]) -> list[int]:
    out, acc = [], 0
    for n in expert_counts:
        out.append(acc)
        acc += n
    return out


@dataclass(frozen=True)
class Segment:
    actor: int
    expert: int
    start: int  # first row in the sorted copies
    count: int


@dataclass(frozen=True)
class Destination:
    """All segments bound for one actor: rows [start, stop) of the sorted copies."""

    actor: int
    segments: tuple[Segment, ...]

    @property
    def start(self) -> int:
        return self.segments[0].start

    @property
    def stop(self) -> int:
        last = self.segments[-1]
        return last.start + last.count

    @property
    def experts(self) -> list[int]:
        return [s.expert for s in self.segments]

    @property
    def counts(self) -> list[int]:
        return [s.count for s in self.segments]


@dataclass(frozen=True, eq=False)
class DispatchPlan:
    layer: int
    num_tokens: int
    top_k: int
    num_experts: int
    placement_version: int
    order: torch.Tensor  # [T*k] long
    token_index: torch.Tensor  # [T*k] long
    segments: tuple[Segment, ...]
    expert_counts: torch.Tensor  # [E] long: token copies per expert (load statistics)

    @classmethod
    def build(cls, expert_ids_tk: torch.Tensor, placement: Placement, layer: int,
              mask_tk: torch.Tensor | None = None) -> DispatchPlan:  # fmt: skip
        """`mask_tk` [T, k] bool: which slots are real copies (None = all)."""
        if expert_ids_tk.dim() != 2:
            raise ValueError(f"expert_ids has shape {list(expert_ids_tk.shape)}: expected [tokens, top_k]")
        if mask_tk is not None and tuple(mask_tk.shape) != tuple(expert_ids_tk.shape):
            raise ValueError(f"mask has shape {list(mask_tk.shape)}: expected expert_ids' "
                             f"{list(expert_ids_tk.shape)}")
        if not 0 <= layer < placement.num_layers:
            raise ValueError(f"layer = {layer}: placement has {placement.num_layers} layers")
        num_tokens, top_k = expert_ids_tk.shape
        num_experts = placement.num_experts
        if mask_tk is None and num_tokens * top_k <= SMALL_PLAN_COPIES:
            return cls._build_small(expert_ids_tk, placement, layer)
        flat = expert_ids_tk.reshape(-1).to(torch.long)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
            raise ValueError(f"expert_ids out of range [0, {num_experts}): min {int(flat.min())}, max {int(flat.max())}")
        if mask_tk is None:
            by_expert = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=num_experts)
        else:  # sorted positions of the real slots only
            real = torch.nonzero(mask_tk.reshape(-1), as_tuple=True)[0]
            by_expert = real.index_select(0, torch.argsort(flat.index_select(0, real), stable=True))
            counts = torch.bincount(flat.index_select(0, real), minlength=num_experts)

        pieces = split_over_replicas(counts.tolist(), placement.replicas[layer])
        src_start = _expert_offsets(counts.tolist())
        # Each piece takes the next `count` copies of its expert, in token order.
        taken = {}

        segments = []
        idx_chunks = []
        start = 0
        for actor, expert, c in pieces:
            s = src_start[expert] + taken.get(expert, 0)
            taken[expert] = taken.get(expert, 0) + c
            segments.append(Segment(actor, expert, start, c))
            idx_chunks.append(by_expert[s : s + c])
            start += c
        order = torch.cat(idx_chunks) if idx_chunks else flat.new_zeros(0)
        return cls(
            layer=layer,
            num_tokens=num_tokens,
            top_k=top_k,
            num_experts=num_experts,
            placement_version=placement.version,
            order=order,
            token_index=order // top_k,
            segments=tuple(segments),
            expert_counts=counts,
        )

    @classmethod
    def _build_small(cls, expert_ids_tk: torch.Tensor, placement: Placement, layer: int) -> DispatchPlan:
        """`build` for a few copies (a decode step): the same plan from plain Python lists, one host read of the
        ids instead of argsort / bincount / min / max round trips, which dominate at a handful of tokens."""
        num_tokens, top_k = expert_ids_tk.shape
        num_experts = placement.num_experts
        flat = expert_ids_tk.reshape(-1).to(torch.long).tolist()
        if flat and (min(flat) < 0 or max(flat) >= num_experts):
            raise ValueError(f"expert_ids out of range [0, {num_experts}): min {min(flat)}, max {max(flat)}")
        counts = [0] * num_experts
        for e in flat:
            counts[e] += 1
        by_expert = sorted(range(len(flat)), key=flat.__getitem__)  # stable, as argsort(stable=True)
        src_start = _expert_offsets(counts)
        taken: dict[int, int] = {}
        segments, order = [], []
        for actor, expert, c in split_over_replicas(counts, placement.replicas[layer]):
            s = src_start[expert] + taken.get(expert, 0)
            taken[expert] = taken.get(expert, 0) + c
            segments.append(Segment(actor, expert, len(order), c))
            order += by_expert[s : s + c]
        device = expert_ids_tk.device
        return cls(
            layer=layer,
            num_tokens=num_tokens,
            top_k=top_k,
            num_experts=num_experts,
            placement_version=placement.version,
            order=torch.tensor(order, dtype=torch.long, device=device),
            token_index=torch.tensor([n // top_k for n in order], dtype=torch.long, device=device),
            segments=tuple(segments),
            expert_counts=torch.tensor(counts, dtype=torch.long, device=device),
        )

    @property
    def num_copies(self) -> int:
        """Token copies sent to experts: T*k for fixed top-k, the real slots with a mask."""
        return int(self.order.numel())

    @cached_property  # read once per dispatch and once per backward: build it once
    def destinations(self) -> tuple[Destination, ...]:
        return tuple(Destination(a, tuple(segs)) for a, segs in groupby(self.segments, key=lambda s: s.actor))

    def actor_rows(self, num_actors: int) -> list[int]:
        rows = [0] * num_actors
        for s in self.segments:
            rows[s.actor] += s.count
        return rows

    def gather(self, x_td: torch.Tensor) -> torch.Tensor:
        """[T, d] -> [num_copies, d] token copies in plan order."""
        return x_td.index_select(0, self.token_index)

    def combine(self, y_nd: torch.Tensor, weights_tk: torch.Tensor) -> torch.Tensor:
        """Expert outputs in plan order, weighted by their gates, summed back per token: [num_copies, d] -> [T, d]."""
        gate_n = weights_tk.reshape(-1).index_select(0, self.order)
        if gate_n.dtype != y_nd.dtype:
            gate_n = gate_n.to(y_nd.dtype)
        out = y_nd.new_zeros(self.num_tokens, y_nd.shape[-1])
        return out.index_add_(0, self.token_index, y_nd * gate_n.unsqueeze(-1))  # in place: `out` is fresh

    def combine_parts(self, parts_nd: Iterable[torch.Tensor], weights_tk: torch.Tensor) -> torch.Tensor:
        """`combine` of y_nd given as consecutive row blocks (e.g. one view per reply, in plan order; an iterator
        may produce each as it arrives), without joining them first: the same products summed in the same order
        (index_add runs over the rows in order), so bit-equal to combine(torch.cat(parts_nd), weights_tk) in fp32
        (CPU index_add accumulates bf16/fp16 rows differently in pieces: close, not equal). For inference (no
        graph through the parts); at least one part."""
        gate_n = weights_tk.reshape(-1).index_select(0, self.order)
        out = None
        start = 0
        for y in parts_nd:
            if out is None:
                out = y.new_zeros(self.num_tokens, y.shape[-1])
                if gate_n.dtype != y.dtype:
                    gate_n = gate_n.to(y.dtype)
            stop = start + y.shape[0]
            out.index_add_(0, self.token_index[start:stop], y * gate_n[start:stop].unsqueeze(-1))
            start = stop
        if out is None or start != self.num_copies:
            raise ValueError(f"parts hold {start} rows: the plan has {self.num_copies} token copies")
        return out
