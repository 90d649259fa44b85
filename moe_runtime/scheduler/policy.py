"""Placement policy: a pure function from (load snapshot, placement, capacities, parameters) to a decision.

No I/O, no clock, no randomness: the same inputs give the same decision. ``migrate.py`` applies it.

Objective. Per layer the bottleneck is the busiest actor (an MoE layer waits for its slowest expert actor),
so balance means a low ``sum_l max_a load[l, a]``, i.e. a high vLLM balancedness ``sum_l mean / sum_l max``
(the mean does not depend on the placement). Loads assume the dispatcher splits a replicated expert's
tokens evenly over its replicas. Bytes have a price: the policy minimises
``J = sum_l (max_l + min_gain_per_copy * mean_l * copies_l)``, so a copy must lower its layer's max load
by at least ``min_gain_per_copy`` (default 1%) of the layer's mean load; 0 chases balance at any cost.
Without that price, ties in the max hide a wide spread in bytes (docs/measurements.md).

Costs and limits. Copying an expert replica onto an actor that did not hold it before the decision costs
``bytes_per_expert`` (weights + optimizer state); dropping one is free. Per decision at most
``byte_budget`` bytes move. Every actor holds at most ``slots_per_actor`` replicas per layer and at most
``memory_slots_per_actor`` over all layers; every expert keeps >= 1 replica, on distinct actors, and the
policy never raises an expert above ``max_replicas_per_expert`` replicas. No layer's max load ever rises.

Algorithm (layers are independent except for the shared byte budget and memory); each stage has its module:
1. Targets per layer, ignoring the budget (targets.py): LPT packings of EPLB-greedy replica counts and
   DeepSeek EPLB's own plan (eplb.py) relabelled onto our actors by a maximum-overlap assignment
   (matching.py), pruned and partly polished: a menu of (max, copies) options per layer.
2. Under the budget: from the current placement, swap in whole-layer options greedily by J-gain per copy
   (a multiple-choice knapsack, knapsack.py) while budget and memory allow.
3. Local search from there and, separately, from the current placement (search.py): drop / move /
   replicate / replicate-evicting-a-spare-replica / swap, always taking load off the busiest actor of a
   layer, best gain per copy first across layers; the prefix of the move sequence with the lowest J is kept.
4. EPLB floor (knapsack.py): a layer still above EPLB's max load for that layer is replaced by its cheapest
   option that is not, where budget and memory allow. With an unlimited budget (and no memory limit) the
   result is therefore never less balanced than EPLB on the same snapshot.
5. The better candidate (lower J, then fewer bytes) is proposed only when the relative drop of
   ``sum_l max`` is at least ``min_gain``; otherwise the input placement is returned unchanged.
Node balance enters through the node-first packing only; the objective is per actor.
"""

from __future__ import annotations

import numpy as np

from moe_runtime.placement import Placement, copies_between, diff_moves
from moe_runtime.scheduler.eplb import eplb_placement
from moe_runtime.scheduler.knapsack import eplb_floor, knapsack
from moe_runtime.scheduler.layer import LayerState, SlotLimits, memory_left, objective
from moe_runtime.scheduler.load import LoadSnapshot, actor_loads
from moe_runtime.scheduler.matching import align_actors
from moe_runtime.scheduler.search import local_search
from moe_runtime.scheduler.targets import layer_targets
from moe_runtime.scheduler.types import Capacities, PlacementDecision, PolicyParams

# decide with its inputs and output, and the two measures callers compare placements by
__all__ = ["Capacities", "PlacementDecision", "PolicyParams", "align_actors", "bytes_moved", "decide"]


def decide(
    snapshot: LoadSnapshot, placement: Placement, caps: Capacities, cfg: PolicyParams
) -> PlacementDecision:
    """Propose a new placement for the load in `snapshot` (see the module docstring). Pure and deterministic."""
    nodes = _validate(snapshot, placement, caps)
    W = np.asarray(snapshot.tokens, dtype=np.float64)
    L, E, A = placement.num_layers, placement.num_experts, placement.num_actors
    B = caps.bytes_per_expert
    mem_limit = caps.memory_slots_per_actor
    max_rep = min(A, cfg.max_replicas_per_expert or A)
    budget_copies = None if cfg.byte_budget is None or B == 0 else cfg.byte_budget // B

    loads0 = actor_loads(W, placement)
    max0 = loads0.max(axis=1)
    mean_total = float(loads0.mean(axis=1).sum())
    bal0 = mean_total / float(max0.sum()) if mean_total > 0 else 1.0

    def unchanged(reason: str) -> PlacementDecision:
        counts = tuple(tuple(r) for r in placement.replica_counts())
        before = tuple(map(float, max0))
        return PlacementDecision(placement, False, counts, (), bal0, bal0, 0, reason, before, before)

    if mean_total <= 0:
        return unchanged("no load recorded: nothing to balance")

    orig = [[frozenset(a) for a in row] for row in placement.replicas]
    base = [LayerState(W[l], placement.replicas[l], A, orig[l]) for l in range(L)]
    mem_left = memory_left(base, mem_limit)
    price = cfg.min_gain_per_copy
    slots = caps.slots_per_actor
    polish_iters = 4 * E
    max_steps = 4 * L * E

    # 1. Whole-layer targets (ours and EPLB's, on our actors), ignoring the budget; EPLB's max per layer: the floor
    eplb = align_actors(eplb_placement(W, A, slots, nodes), placement)
    options = []
    floor = []
    for l in range(L):
        cap = [slots] * A if mem_left is None else [min(slots, base[l].used(a) + mem_left[a]) for a in range(A)]
        lim = SlotLimits(cap, max_rep, None)  # memory over layers is checked when targets are combined
        options.append(layer_targets(base[l], lim, nodes, eplb.replicas[l], polish_iters))
        floor.append(LayerState(W[l], eplb.replicas[l], A, orig[l]).max)

    # 2.-4. Candidate 1: local search from the current placement. Candidate 2: targets first, then local search.
    cand1 = local_search([l.copy() for l in base], max_rep, slots, mem_limit, price, budget_copies, max_steps)
    cand2 = knapsack(base, options, price, budget_copies, mem_limit)
    cand2 = local_search(cand2, max_rep, slots, mem_limit, price, budget_copies, max_steps)
    cand1 = eplb_floor(cand1, options, floor, budget_copies, mem_limit)
    cand2 = eplb_floor(cand2, options, floor, budget_copies, mem_limit)

    # 5. The better candidate (lower J, then fewer copies), proposed only if it gains at least min_gain.
    def score(layers: list[LayerState]) -> tuple[float, int]:
        return (objective(layers, price), sum(l.copies for l in layers))

    s1, s2 = score(cand1), score(cand2)
    tol = 1e-9 * max(1.0, s1[0])
    best = cand2 if (s2[0] < s1[0] - tol or (abs(s2[0] - s1[0]) <= tol and s2[1] < s1[1])) else cand1
    new_placement = placement.with_replicas(tuple(l.rows() for l in best))
    max1 = actor_loads(W, new_placement).max(axis=1)
    old_sum, new_sum = float(max0.sum()), float(max1.sum())
    bal1 = mean_total / new_sum
    moved = bytes_moved(placement, new_placement, B)
    gain = (old_sum - new_sum) / old_sum
    if gain <= 1e-12:
        return unchanged(
            f"no placement within the limits lowers the max actor load (balancedness {bal0:.4f})"
        )
    if gain < cfg.min_gain:
        return unchanged(
            f"predicted gain {gain:.2%} < min_gain {cfg.min_gain:.2%} "
            f"(balancedness {bal0:.4f} -> {bal1:.4f}, {moved} bytes): kept"
        )
    moves = diff_moves(placement, new_placement, nodes)
    kinds = {k: sum(1 for m in moves if m.kind == k) for k in ("replicate", "move", "drop")}
    budget_txt = "unlimited" if cfg.byte_budget is None else f"{cfg.byte_budget}"
    reason = (
        f"balancedness {bal0:.4f} -> {bal1:.4f} (sum of per-layer max load -{gain:.2%}); "
        f"{kinds['replicate']} replicate, {kinds['move']} move, {kinds['drop']} drop; "
        f"{moved} bytes of budget {budget_txt}"
    )
    return PlacementDecision(
        placement=new_placement,
        changed=True,
        replica_counts=tuple(tuple(r) for r in new_placement.replica_counts()),
        moves=moves,
        balancedness_before=bal0,
        balancedness_after=bal1,
        bytes_to_move=moved,
        reason=reason,
        layer_max_before=tuple(map(float, max0)),
        layer_max_after=tuple(map(float, max1)),
    )


def bytes_moved(old: Placement, new: Placement, bytes_per_expert: int) -> int:
    """bytes_per_expert x number of (layer, expert, actor) replicas in `new` that are not in `old`."""
    return copies_between(old, new) * bytes_per_expert


def _validate(snapshot: LoadSnapshot, placement: Placement, caps: Capacities) -> list[int]:
    """The node of each actor; raises ValueError when the snapshot, placement and capacities disagree."""
    L, E, A = placement.num_layers, placement.num_experts, placement.num_actors
    if snapshot.tokens.shape != (L, E):
        raise ValueError(
            f"snapshot tokens shape {snapshot.tokens.shape}: placement has {L} layers x {E} experts"
        )
    if caps.actor_nodes and placement.actor_nodes and caps.actor_nodes != placement.actor_nodes:
        raise ValueError(
            f"caps.actor_nodes {caps.actor_nodes} != placement.actor_nodes {placement.actor_nodes}"
        )
    nodes = list(caps.actor_nodes or placement.actor_nodes or (0,) * A)
    if len(nodes) != A:
        raise ValueError(f"actor_nodes has {len(nodes)} entries: placement has {A} actors")
    per_actor_total = [0] * A
    for layer, row in enumerate(placement.replicas):
        used = [0] * A
        for actors in row:
            for a in actors:
                used[a] += 1
        for a in range(A):
            if used[a] > caps.slots_per_actor:
                raise ValueError(
                    f"placement has {used[a]} replicas on actor {a} in layer {layer}: "
                    f"more than slots_per_actor = {caps.slots_per_actor}"
                )
            per_actor_total[a] += used[a]
    if caps.memory_slots_per_actor is not None:
        for a in range(A):
            if per_actor_total[a] > caps.memory_slots_per_actor:
                raise ValueError(
                    f"placement has {per_actor_total[a]} replicas on actor {a}: more than "
                    f"memory_slots_per_actor = {caps.memory_slots_per_actor}"
                )
    return nodes
