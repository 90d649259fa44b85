"""SwiGLU experts: stacked weights and a grouped forward over tokens sorted by expert.

Yuan-M32 expert: w1: d -> 2*ffn (no bias), split in halves (a, g); out = w2(silu(a) * g); SiLU on the FIRST half.
Weights are stored stacked: w1 [E, d, 2*ffn], w2 [E, ffn, d], so `x @ w1[e]` needs no transpose.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(x_nd: torch.Tensor, w1_d2f: torch.Tensor, w2_fd: torch.Tensor) -> torch.Tensor:
    """One expert on a block of tokens."""
    a, g = (x_nd @ w1_d2f).chunk(2, dim=-1)
    return (F.silu(a) * g) @ w2_fd


def grouped_swiglu(
    x_nd: torch.Tensor,
    counts: Sequence[int],
    w1_ed2f: torch.Tensor,
    w2_efd: torch.Tensor,
    weight_index: Sequence[int] | None = None,
) -> torch.Tensor:
    """Run expert weight_index[i] (default i) on rows [sum(counts[:i]), +counts[i]) of x_nd.

    Rows are sorted by group; groups with zero rows are skipped. One matmul pair per non-empty group: measured on
    this CPU, a loop over contiguous slices beats padded bmm and torch._grouped_mm (see benchmarks/expert_compute.py).
    """
    if sum(counts) != x_nd.shape[0]:
        raise ValueError(f"counts sum to {sum(counts)}: expected x rows ({x_nd.shape[0]})")
    index = range(len(counts)) if weight_index is None else weight_index
    outs = []
    start = 0
    for i, n in zip(index, counts):
        if n:
            outs.append(swiglu(x_nd[start : start + n], w1_ed2f[i], w2_efd[i]))
        start += n
    if not outs:
        return x_nd.new_zeros(0, w2_efd.shape[-1])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts of one MoE layer, weights stacked."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, init_std: float = 0.02):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * ffn_hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        nn.init.normal_(self.w1, std=init_std)
        nn.init.normal_(self.w2, std=init_std)

    def forward(self, x_nd: torch.Tensor, counts: Sequence[int], expert_ids: Sequence[int]) -> torch.Tensor:
        return grouped_swiglu(x_nd, counts, self.w1, self.w2, expert_ids)
