"""Routers: Yuan-M32's Attention Router and the classical linear router. Both return a RouterOutput.

Attention Router (Yuan 2.0-M32 paper; IEIT-Yuan/Yuan2.0-M32 `megatron/core/transformer/moe/router.py`):
per token x, q = Wq x, k = Wk x, v = Wv x in R^E; A[i, j] = q_i k_j (no scale, no mask); S = softmax_j(A);
logits_i = sum_j S[i, j] v_j. Computed in fp32. Top-k logits, gates = softmax over those k only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RouterOutput:
    expert_ids: torch.Tensor  # [T, k] long, in descending gate order
    weights: torch.Tensor  # [T, k] gates (sum to 1 per token), input dtype
    probs: torch.Tensor  # [T, E] fp32 softmax over all experts (load statistics, aux loss)
    aux_loss: torch.Tensor  # scalar fp32 (0 when the coefficient is 0)


def top_k_gates(logits_te: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k logits, softmax over the k selected (== softmax over all, top-k, renormalise)."""
    top_logits, expert_ids = torch.topk(logits_te, k, dim=-1, sorted=True)
    return expert_ids, torch.softmax(top_logits, dim=-1)


def switch_load_balancing_loss(probs_te: torch.Tensor, expert_ids_tk: torch.Tensor, coeff: float) -> torch.Tensor:
    """Switch-style: coeff * E * sum_e mean_t(p[t, e]) * mean_t(chosen[t, e]) / k."""
    if coeff == 0.0:
        return probs_te.new_zeros(())
    num_experts, k = probs_te.shape[-1], expert_ids_tk.shape[-1]
    chosen_te = torch.zeros_like(probs_te).scatter_(-1, expert_ids_tk, 1.0)
    return coeff * num_experts * torch.sum(probs_te.mean(0) * chosen_te.mean(0) / k)


class _Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, aux_loss_coeff: float = 0.0):
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"top_k = {top_k}: must be <= num_experts ({num_experts})")
        self.num_experts, self.top_k, self.aux_loss_coeff = num_experts, top_k, aux_loss_coeff

    def logits(self, x_td: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x_td: torch.Tensor) -> RouterOutput:
        logits_te = self.logits(x_td)  # fp32
        expert_ids, gates = top_k_gates(logits_te, self.top_k)
        probs = torch.softmax(logits_te, dim=-1)
        aux = switch_load_balancing_loss(probs, expert_ids, self.aux_loss_coeff)
        return RouterOutput(expert_ids, gates.to(x_td.dtype), probs, aux)


class AttentionRouter(_Router):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, aux_loss_coeff: float = 0.0,
                 init_std: float = 0.02):
        super().__init__(hidden_size, num_experts, top_k, aux_loss_coeff)
        # Wq, Wk, Wv fused as one [3E, d] matrix, no bias: 3*E*d parameters.
        self.wqkv = nn.Parameter(torch.empty(3 * num_experts, hidden_size))
        nn.init.normal_(self.wqkv, std=init_std)

    def logits(self, x_td: torch.Tensor) -> torch.Tensor:
        q, k, v = (x_td.float() @ self.wqkv.float().t()).chunk(3, dim=-1)  # [T, E] each
        scores_tee = q.unsqueeze(-1) * k.unsqueeze(-2)  # A[t, i, j] = q_i k_j
        return torch.einsum("tij,tj->ti", torch.softmax(scores_tee, dim=-1), v)


class LinearRouter(_Router):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, aux_loss_coeff: float = 0.0,
                 init_std: float = 0.02):
        super().__init__(hidden_size, num_experts, top_k, aux_loss_coeff)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=init_std)

    def logits(self, x_td: torch.Tensor) -> torch.Tensor:
        return F.linear(x_td.float(), self.weight.float())


def build_router(kind: str, hidden_size: int, num_experts: int, top_k: int, aux_loss_coeff: float,
                 init_std: float) -> _Router:
    routers = {"attention": AttentionRouter, "linear": LinearRouter}
    if kind not in routers:
        raise ValueError(f"router = {kind!r}: expected one of {sorted(routers)}")
    return routers[kind](hidden_size, num_experts, top_k, aux_loss_coeff, init_std)
