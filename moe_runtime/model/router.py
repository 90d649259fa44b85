"""Routers: Yuan-M32's Attention Router and the classical linear router. Both return a RouterOutput.

Attention Router (Yuan 2.0-M32 paper; IEIT-Yuan/Yuan2.0-M32 `megatron/core/transformer/moe/router.py`):
per token x, q = Wq x, k = Wk x, v = Wv x in R^E; A[i, j] = q_i k_j (no scale, no mask); S = softmax_j(A);
logits_i = sum_j S[i, j] v_j. Computed in fp32. Top-k logits, gates = softmax over those k only.

Which experts a token takes is the routing rule (model/routing.py: topk, grouped, top_p, node_limited), the same
for both routers. Node-limited routing needs the expert -> node map: `set_expert_nodes` whenever it changes.
Serving around dead experts: `set_expert_alive` (the rule runs over the live experts only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_runtime.model.routing import (
    RoutingSpec,
    Selection,
    check_expert_alive,
    check_expert_nodes,
    entropy_loss,
    mask_dead,
    select_grouped,
    select_node_limited,
    select_top_p,
    top_k_gates,
)


@dataclass(frozen=True)
class RouterOutput:
    expert_ids: torch.Tensor  # [T, k] long, in descending gate order (k = k_max slots for top_p)
    weights: torch.Tensor  # [T, k] gates, input dtype (topk: sum to 1 per token; 0 at masked slots)
    probs: torch.Tensor  # [T, E] fp32 softmax over all experts (load statistics, aux loss)
    aux_loss: torch.Tensor  # scalar fp32 (0 when the coefficients are 0)
    mask: torch.Tensor | None = None  # [T, k] bool: the real slots (top_p); None = every slot is real

    def experts_per_token(self) -> float:
        """Mean experts a token took."""
        k = self.expert_ids.shape[-1]
        return float(k) if self.mask is None else float(self.mask.sum()) / max(1, self.mask.shape[0])


def switch_load_balancing_loss(probs_te: torch.Tensor, expert_ids_tk: torch.Tensor, coeff: float,
                               mask_tk: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Switch-style: coeff * E * sum_e mean_t(p[t, e]) * (share of the token copies that went to e).
    With a fixed k the share is mean_t(chosen[t, e]) / k; with a mask, chosen copies / all real copies."""
    if coeff == 0.0:
        return probs_te.new_zeros(())
    num_experts, k = probs_te.shape[-1], expert_ids_tk.shape[-1]
    if mask_tk is None:
        chosen_te = torch.zeros_like(probs_te).scatter_(-1, expert_ids_tk, 1.0)
        return coeff * num_experts * torch.sum(probs_te.mean(0) * chosen_te.mean(0) / k)
    chosen_te = torch.zeros_like(probs_te).scatter_add_(-1, expert_ids_tk, mask_tk.to(probs_te.dtype))
    share_e = chosen_te.sum(0) / mask_tk.sum().clamp_min(1)
    return coeff * num_experts * torch.sum(probs_te.mean(0) * share_e)


def _as_fp32(t: torch.Tensor) -> torch.Tensor:
    """t.float() without the no-op dispatch when t is float32 already (twice per layer per decode step)."""
    return t if t.dtype == torch.float32 else t.float()


class _Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, aux_loss_coeff: float = 0.0,
                 routing: RoutingSpec | None = None):  # fmt: skip
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"top_k = {top_k}: must be <= num_experts ({num_experts})")
        self.num_experts, self.top_k, self.aux_loss_coeff = num_experts, top_k, aux_loss_coeff
        self.routing = routing or RoutingSpec("topk", top_k)
        if self.routing.top_k != top_k:
            raise ValueError(f"routing.top_k = {self.routing.top_k}: must equal the router's top_k ({top_k})")
        self.routing.check(num_experts)
        self.expert_nodes_e: torch.Tensor | None = None  # node_limited: node of each expert
        self.expert_alive_e: torch.Tensor | None = None  # [E] bool, None = all alive (serving around dead experts)

    def set_expert_nodes(self, expert_nodes: tuple[int, ...] | list[int]) -> None:
        """The expert -> node map node-limited routing selects by (call again when the placement changes)."""
        check_expert_nodes(expert_nodes, self.num_experts, self.top_k, self.routing.max_nodes)
        self.expert_nodes_e = torch.tensor(list(expert_nodes), dtype=torch.long)

    def set_expert_alive(self, alive: Sequence[bool] | torch.Tensor | None) -> None:
        """Route only to the live experts (model/routing.py, masked experts); None or all alive = no mask. Set by
        the runtime while an expert has no live replica (serving, transport.on_expert_failure = mask)."""
        if alive is None:
            self.expert_alive_e = None
            return
        flags = [bool(a) for a in (alive.tolist() if isinstance(alive, torch.Tensor) else alive)]
        nodes = None if self.expert_nodes_e is None else self.expert_nodes_e.tolist()
        check_expert_alive(flags, self.routing, self.num_experts, nodes)
        self.expert_alive_e = None if all(flags) else torch.tensor(flags, dtype=torch.bool)

    def masked_experts(self) -> list[int]:
        """The experts routing excludes now (set_expert_alive)."""
        return [] if self.expert_alive_e is None else (~self.expert_alive_e).nonzero().flatten().tolist()

    def logits(self, x_td: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _zero_aux(self, device: torch.device) -> torch.Tensor:
        """A scalar fp32 zero kept for inference forwards without an aux loss (read-only: callers add to it)."""
        zero = self.__dict__.get("_zero")
        if zero is None or zero.device != device:
            with torch.inference_mode(False):  # a normal tensor: usable by later no_grad forwards too
                zero = self.__dict__["_zero"] = torch.zeros((), dtype=torch.float32, device=device)
        return zero

    def select(self, logits_te: torch.Tensor, probs_te: torch.Tensor) -> Selection:
        r = self.routing
        if r.kind == "grouped":
            return select_grouped(probs_te, r.top_k, r.groups)
        if r.kind == "top_p":
            alive = None if self.expert_alive_e is None else self.expert_alive_e.to(probs_te.device)
            return select_top_p(probs_te, r.top_p, r.slots(self.num_experts), alive)
        if r.kind == "node_limited":
            if self.expert_nodes_e is None:
                raise RuntimeError("node_limited routing: no expert -> node map; call set_expert_nodes (the "
                                   "runtime does on every placement change, an in-process run with its layout)")
            return select_node_limited(logits_te, probs_te, r.top_k, r.max_nodes,
                                       self.expert_nodes_e.to(logits_te.device))
        raise AssertionError(r.kind)

    def forward(self, x_td: torch.Tensor) -> RouterOutput:
        logits_te = self.logits(x_td)  # fp32
        if self.expert_alive_e is not None:  # serving around dead experts: every rule runs over the live ones
            logits_te = mask_dead(logits_te, self.expert_alive_e)
        if self.routing.kind == "topk":  # the original path, bit for bit
            expert_ids, gates = top_k_gates(logits_te, self.top_k)
            probs = torch.softmax(logits_te, dim=-1)
            if self.aux_loss_coeff == 0.0 and not torch.is_grad_enabled():
                aux = self._zero_aux(probs.device)  # the loss's own zero, minus a new_zeros per layer per step
            else:
                aux = switch_load_balancing_loss(probs, expert_ids, self.aux_loss_coeff)
            return RouterOutput(expert_ids, gates if gates.dtype == x_td.dtype else gates.to(x_td.dtype), probs, aux)
        probs = torch.softmax(logits_te, dim=-1)
        sel = self.select(logits_te, probs)
        aux = switch_load_balancing_loss(probs, sel.expert_ids, self.aux_loss_coeff, sel.mask)
        if self.routing.kind == "top_p":
            aux = aux + entropy_loss(probs, self.routing.dynamic_loss_coeff)
        return RouterOutput(sel.expert_ids, sel.gates.to(x_td.dtype), probs, aux, sel.mask)


class AttentionRouter(_Router):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, aux_loss_coeff: float = 0.0,
                 init_std: float = 0.02, routing: RoutingSpec | None = None):
        super().__init__(hidden_size, num_experts, top_k, aux_loss_coeff, routing)
        # Wq, Wk, Wv fused as one [3E, d] matrix, no bias: 3*E*d parameters.
        self.wqkv = nn.Parameter(torch.empty(3 * num_experts, hidden_size))
        nn.init.normal_(self.wqkv, std=init_std)

    def logits(self, x_td: torch.Tensor) -> torch.Tensor:
        wqkv = self._parameters["wqkv"]  # by dict: `self.wqkv` is an nn.Module attribute miss (~5k instructions)
        qkv_t3e = F.linear(_as_fp32(x_td), _as_fp32(wqkv))  # x @ wqkv^T: a fresh contiguous [T, 3E]
        if not torch.is_grad_enabled():  # a decode step is per-op overhead:
            # q [T, E, 1], k [T, 1, E], v [T, E, 1] as strided views of the thirds (3 calls, not chunk + 3
            # unsqueezes; the same numbers), then the bmm the einsum runs, without its Python planning
            t, e, off = qkv_t3e.shape[0], self.num_experts, qkv_t3e.storage_offset()
            q = qkv_t3e.as_strided((t, e, 1), (3 * e, 1, 1), off)
            k = qkv_t3e.as_strided((t, 1, e), (3 * e, e, 1), off + e)
            v = qkv_t3e.as_strided((t, e, 1), (3 * e, 1, 1), off + 2 * e)
            return torch.bmm(torch.softmax(q * k, dim=-1), v).squeeze(-1)  # q * k: A[t, i, j] = q_i k_j
        q, k, v = qkv_t3e.chunk(3, dim=-1)  # [T, E] each
        scores_tee = q.unsqueeze(-1) * k.unsqueeze(-2)  # A[t, i, j] = q_i k_j
        return torch.einsum("tij,tj->ti", torch.softmax(scores_tee, dim=-1), v)


class LinearRouter(_Router):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, aux_loss_coeff: float = 0.0,
                 init_std: float = 0.02, routing: RoutingSpec | None = None):
        super().__init__(hidden_size, num_experts, top_k, aux_loss_coeff, routing)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=init_std)

    def logits(self, x_td: torch.Tensor) -> torch.Tensor:
        return F.linear(_as_fp32(x_td), _as_fp32(self._parameters["weight"]))  # by dict: no attribute miss


def build_router(kind: str, hidden_size: int, num_experts: int, top_k: int, aux_loss_coeff: float,
                 init_std: float, routing: RoutingSpec | None = None) -> _Router:
    routers = {"attention": AttentionRouter, "linear": LinearRouter}
    if kind not in routers:
        raise ValueError(f"router = {kind!r}: expected one of {sorted(routers)}")
    return routers[kind](hidden_size, num_experts, top_k, aux_loss_coeff, init_std, routing)
