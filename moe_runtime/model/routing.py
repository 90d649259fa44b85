"""Routing rules: which experts each token takes and with what gate, from the router's fp32 logits [T, E].

- topk: the k largest logits, gates = softmax over those k (Yuan 2.0-M32; bit-identical to the original router).
- grouped (MoGE, Pangu Pro MoE, arXiv 2505.21411): experts in G equal contiguous groups; each token takes its
  top-(k/G) inside every group, so every group gets exactly T*k/G copies. Gates as the paper: the global softmax
  scores of the chosen experts, the others zeroed (no renormalisation).
- top_p (Huang et al., "Harder Tasks Need More Experts", ACL 2024): experts in descending probability until
  their mass reaches p, at least 1 and at most k_max; gates = the softmax probabilities themselves (the paper
  does not renormalise). The optional dynamic loss is the mean entropy of the routing distribution
  (-sum_e p_e log p_e, minimised so the router cannot spread mass thinly to activate many experts).
  A variable number of copies per token: ids [T, k_max] padded, with a mask of the real slots.
- node_limited (DeepSeek-V3): each token's experts lie on at most M nodes: a node's score is the sum of its
  top-ceil(k/M) expert probabilities (DeepSeek-V3: top-2 with k = 8, M = 4), the M best nodes are kept and the
  top-k is taken among their experts; gates = softmax over the chosen k logits (== normalised probabilities, as
  DeepSeek-V3 normalises its chosen affinities). Needs the expert -> node map (`expert_nodes`), set on the router
  explicitly whenever the placement changes.

Every rule returns ids in descending gate order within a token.

Masked experts (serving with transport.on_expert_failure = mask: an expert whose every replica is down): the router
sets the dead experts' logits to -inf before the rule runs (`mask_dead`), so every rule runs over the live experts
only: topk and node_limited gates are the softmax over the chosen live logits (renormalised over them, as hivemind
does with the experts that answered); grouped and top_p take the softmax over the live experts (their rules do not
renormalise over the chosen ones; the dead experts' mass goes to the live ones). `check_expert_alive` refuses a
mask that leaves a rule fewer experts than it must take (fewer than k alive; a group with fewer than k/G).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from moe_runtime.placement import Placement

if TYPE_CHECKING:
    from moe_runtime.config import ModelConfig

RoutingKind = Literal["topk", "grouped", "top_p", "node_limited"]


@dataclass(frozen=True)
class RoutingSpec:
    """One routing rule and its parameters (validated by ModelConfig; re-checked here for direct use)."""

    kind: RoutingKind = "topk"
    top_k: int = 2
    groups: int = 1  # grouped: G
    top_p: float = 1.0  # top_p: probability mass to reach
    k_max: int | None = None  # top_p: most experts per token (None = all)
    dynamic_loss_coeff: float = 0.0  # top_p: entropy loss coefficient
    max_nodes: int = 1  # node_limited: M

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> RoutingSpec:
        return cls(cfg.routing, cfg.top_k, cfg.routing_groups, cfg.top_p, cfg.k_max, cfg.dynamic_loss_coeff,
                   cfg.max_nodes)

    def slots(self, num_experts: int) -> int:
        """Columns of the [T, slots] id matrix: k, or k_max for top_p."""
        if self.kind == "top_p":
            return self.k_max if self.k_max is not None else num_experts
        return self.top_k

    def check(self, num_experts: int) -> None:
        if self.kind not in ("topk", "grouped", "top_p", "node_limited"):
            raise ValueError(f"routing = {self.kind!r}: expected one of topk, grouped, top_p, node_limited")
        if self.kind == "grouped":
            g = self.groups
            if g < 1 or num_experts % g or self.top_k % g:
                raise ValueError(f"routing_groups = {g}: must divide num_experts ({num_experts}) and top_k "
                                 f"({self.top_k})")
        if self.kind == "top_p":
            if not 0.0 < self.top_p <= 1.0:
                raise ValueError(f"top_p = {self.top_p}: must be in (0, 1]")
            if self.k_max is not None and not 1 <= self.k_max <= num_experts:
                raise ValueError(f"k_max = {self.k_max}: must be in [1, num_experts = {num_experts}]")
        if self.kind == "node_limited" and self.max_nodes < 1:
            raise ValueError(f"max_nodes = {self.max_nodes}: must be >= 1")


@dataclass(frozen=True)
class Selection:
    expert_ids: torch.Tensor  # [T, slots] long, descending gate order; padded slots repeat a real id
    gates: torch.Tensor  # [T, slots] fp32, 0 at padded slots
    mask: torch.Tensor | None  # [T, slots] bool real slots; None = all real


def top_k_gates(logits_te: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k logits, softmax over the k selected (== softmax over all, top-k, renormalise)."""
    top_logits, expert_ids = torch.topk(logits_te, k, dim=-1, sorted=True)
    return expert_ids, torch.softmax(top_logits, dim=-1)


def _by_gate(ids_tk: torch.Tensor, gates_tk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gates_sorted, order = torch.sort(gates_tk, dim=-1, descending=True, stable=True)
    return ids_tk.gather(-1, order), gates_sorted


def select_grouped(probs_te: torch.Tensor, k: int, groups: int) -> Selection:
    t, e = probs_te.shape
    per_group, size = k // groups, e // groups
    top_p, local = torch.topk(probs_te.view(t, groups, size), per_group, dim=-1, sorted=True)  # [T, G, k/G]
    ids = local + (torch.arange(groups, device=probs_te.device) * size).view(1, groups, 1)
    ids, gates = _by_gate(ids.reshape(t, k), top_p.reshape(t, k))
    return Selection(ids, gates, None)


def select_top_p(probs_te: torch.Tensor, p: float, k_max: int, alive_e: torch.Tensor | None = None) -> Selection:
    gates, ids = torch.topk(probs_te, k_max, dim=-1, sorted=True)
    mass_before = torch.cumsum(gates, dim=-1) - gates  # mass of the better experts before each slot
    mask = mass_before < p  # smallest prefix reaching p; slot 0 always (mass_before = 0 < p)
    mask[:, 0] = True
    if alive_e is not None:  # a dead expert (probability 0) fills a slot past the live ones: never a real one
        mask &= alive_e[ids]
    ids = torch.where(mask, ids, ids[:, :1])
    return Selection(ids, gates * mask, mask)


def select_node_limited(logits_te: torch.Tensor, probs_te: torch.Tensor, k: int, max_nodes: int,
                        expert_nodes_e: torch.Tensor) -> Selection:  # fmt: skip
    num_nodes = int(expert_nodes_e.max()) + 1
    if max_nodes < num_nodes:
        member_ne = expert_nodes_e.unsqueeze(0) == torch.arange(num_nodes, device=logits_te.device).unsqueeze(1)
        best = min(math.ceil(k / max_nodes), logits_te.shape[-1])
        # probabilities are >= 0, so zeros outside the node never beat its own experts in the per-node top
        node_scores_tn = torch.topk(probs_te.unsqueeze(1) * member_ne, best, dim=-1).values.sum(-1)
        nodes_tm = torch.topk(node_scores_tn, max_nodes, dim=-1).indices
        allowed_te = member_ne[nodes_tm].any(dim=1)  # [T, M, E] -> [T, E]
        logits_te = logits_te.masked_fill(~allowed_te, float("-inf"))
    ids, gates = top_k_gates(logits_te, k)
    return Selection(ids, gates, None)


def mask_dead(logits_te: torch.Tensor, alive_e: torch.Tensor) -> torch.Tensor:
    """Logits with the dead experts' at -inf: no rule picks them, every softmax gives them 0."""
    return logits_te.masked_fill(~alive_e.to(logits_te.device), float("-inf"))


def check_expert_alive(alive: Sequence[bool], spec: RoutingSpec, num_experts: int,
                       expert_nodes: Sequence[int] | None = None) -> None:  # fmt: skip
    """Every token must still find the experts its rule takes among the live ones."""
    if len(alive) != num_experts:
        raise ValueError(f"expert_alive has {len(alive)} entries: expected num_experts ({num_experts})")
    live = [e for e in range(num_experts) if alive[e]]
    dead = [e for e in range(num_experts) if not alive[e]]
    need = 1 if spec.kind == "top_p" else spec.top_k
    if len(live) < need:
        raise ValueError(f"expert_alive: {len(live)} of {num_experts} experts alive (dead {dead}), fewer than "
                         f"{'the 1 top_p routing takes' if spec.kind == 'top_p' else f'top_k = {spec.top_k}'}")
    if spec.kind == "grouped":
        per_group = spec.top_k // spec.groups
        for g, members in enumerate(expert_groups(num_experts, spec.groups)):
            n = sum(1 for e in members if alive[e])
            if n < per_group:
                raise ValueError(f"expert_alive: group {g} (experts {members[0]}..{members[-1]}) has {n} live "
                                 f"experts, fewer than top_k / routing_groups = {per_group} (dead {dead})")
    if spec.kind == "node_limited" and expert_nodes is not None:
        try:
            check_expert_nodes([expert_nodes[e] for e in live], len(live), spec.top_k, spec.max_nodes)
        except ValueError as err:
            raise ValueError(f"expert_alive: with experts {dead} dead, {err}") from None


def check_expert_nodes(expert_nodes: Sequence[int], num_experts: int, k: int, max_nodes: int) -> None:
    """Every choice of max_nodes nodes must hold >= k experts, or some token could not take k experts."""
    if len(expert_nodes) != num_experts:
        raise ValueError(f"expert_nodes has {len(expert_nodes)} entries: expected num_experts ({num_experts})")
    if min(expert_nodes) < 0:
        raise ValueError(f"expert_nodes = {list(expert_nodes)}: node indices must be >= 0")
    sizes = sorted(sum(1 for n in expert_nodes if n == node) for node in set(expert_nodes))
    if max_nodes < len(sizes) and sum(sizes[:max_nodes]) < k:
        raise ValueError(f"max_nodes = {max_nodes}: the {max_nodes} smallest nodes hold {sum(sizes[:max_nodes])} "
                         f"experts, fewer than top_k = {k} (node sizes {sizes})")


def expert_nodes(placement: Placement, layer: int) -> tuple[int, ...]:
    """The node of each expert of `layer`: its primary replica's node. The scheduler keeps every replica on that
    node under node-limited routing, so rebalancing never changes the routing."""
    return tuple(placement.node_of(placement.primary_of(layer, e)) for e in range(placement.num_experts))


def static_actor_nodes(num_actors: int, num_nodes: int) -> tuple[int, ...]:
    """Actor a on node a * N // A: the layout an in-process run assumes for node-limited routing."""
    return tuple(a * num_nodes // num_actors for a in range(num_actors))


def entropy_loss(probs_te: torch.Tensor, coeff: float) -> torch.Tensor:
    """The dynamic loss of "Harder Tasks Need More Experts": coeff * mean_t(-sum_e p log p)."""
    if coeff == 0.0:
        return probs_te.new_zeros(())
    return coeff * -(probs_te * torch.log(probs_te.clamp_min(1e-20))).sum(-1).mean()


def expert_groups(num_experts: int, groups: int) -> list[list[int]]:
    """The G equal contiguous expert groups of grouped routing."""
    size = num_experts // groups
    return [list(range(g * size, (g + 1) * size)) for g in range(groups)]
