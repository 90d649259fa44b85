"""Expert groups pinned to actor groups: the scheduler's constraint under grouped and node-limited routing.

Grouped routing (MoGE) balances the token copies per expert group by construction, but only if each group's
experts stay on that group's devices; node-limited routing routes by the node an expert lives on, so its replicas
must stay on that node or rebalancing would change the routing. Both are one constraint: experts are partitioned
into groups, actors too, and group g's experts have replicas only on group g's actors.

`decide_within_groups` keeps `policy.decide` untouched: the groups are independent sub-problems (disjoint experts,
disjoint actors), so it runs `decide` on each (byte budget split evenly, min_gain 0), stitches the results and
applies min_gain once to the whole placement's sum of per-layer max actor load. Pure, like `decide`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from moe_runtime.placement import Placement, diff_moves
from moe_runtime.scheduler.load import LoadSnapshot, actor_loads
from moe_runtime.scheduler.policy import bytes_moved, decide
from moe_runtime.scheduler.types import Capacities, PlacementDecision, PolicyParams

__all__ = ["ExpertGroups", "contiguous_groups", "decide_within_groups", "node_groups", "routing_groups"]


@dataclass(frozen=True)
class ExpertGroups:
    """experts[g] may have replicas only on actors[g]; both partition their index ranges."""

    experts: tuple[tuple[int, ...], ...]
    actors: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.experts) != len(self.actors) or not self.experts:
            raise ValueError(f"{len(self.experts)} expert groups and {len(self.actors)} actor groups: expected the "
                             "same number, at least one")
        for name, parts in (("experts", self.experts), ("actors", self.actors)):
            flat = sorted(i for p in parts for i in p)
            if flat != list(range(len(flat))) or any(not p for p in parts):
                raise ValueError(f"{name} groups {[list(p) for p in parts]}: must partition 0..{len(flat) - 1} "
                                 "into non-empty groups")

    @property
    def num_groups(self) -> int:
        return len(self.experts)

    def violations(self, placement: Placement) -> list[str]:
        """'(layer, expert) on actor a, outside group g's actors' for every replica that breaks the constraint."""
        out = []
        for g, (experts, actors) in enumerate(zip(self.experts, self.actors)):
            allowed = set(actors)
            for layer, row in enumerate(placement.replicas):
                for e in experts:
                    out += [f"(layer {layer}, expert {e}) on actor {a}, outside group {g}'s actors {list(actors)}"
                            for a in row[e] if a not in allowed]
        return out


def contiguous_groups(num_experts: int, num_actors: int, groups: int) -> ExpertGroups:
    """G equal contiguous expert groups on G equal contiguous actor groups (MoGE: one group per device group)."""
    if groups < 1 or num_experts % groups or num_actors % groups:
        raise ValueError(f"groups = {groups}: must divide num_experts ({num_experts}) and num_actors ({num_actors})")
    e, a = num_experts // groups, num_actors // groups
    return ExpertGroups(tuple(tuple(range(g * e, (g + 1) * e)) for g in range(groups)),
                        tuple(tuple(range(g * a, (g + 1) * a)) for g in range(groups)))


def node_groups(placement: Placement, layer: int = 0) -> ExpertGroups:
    """Experts grouped by their primary replica's node (of `layer`; the static layouts are the same in every
    layer), actors by their node. Nodes without experts join no group: their actors are left out."""
    nodes = sorted({placement.node_of(placement.primary_of(layer, e)) for e in range(placement.num_experts)})
    experts = tuple(tuple(e for e in range(placement.num_experts)
                          if placement.node_of(placement.primary_of(layer, e)) == n) for n in nodes)  # fmt: skip
    actors = [[a for a in range(placement.num_actors) if placement.node_of(a) == n] for n in nodes]
    spare = [a for a in range(placement.num_actors) if placement.node_of(a) not in nodes]
    actors[0] += spare  # keep the actors a partition; a node without experts adds capacity to group 0 only
    return ExpertGroups(experts, tuple(tuple(sorted(a)) for a in actors))


def routing_groups(routing: str, groups: int, placement: Placement) -> ExpertGroups | None:
    """The constraint a routing rule puts on placements: None for topk and top_p (no constraint)."""
    if routing == "grouped":
        return contiguous_groups(placement.num_experts, placement.num_actors, groups)
    if routing == "node_limited":
        return node_groups(placement)
    return None


def _sub_placement(placement: Placement, experts: tuple[int, ...], actors: tuple[int, ...]) -> Placement:
    local = {a: i for i, a in enumerate(actors)}
    rows = tuple(tuple(tuple(local[a] for a in row[e]) for e in experts) for row in placement.replicas)
    return Placement(len(actors), rows, placement.version, tuple(placement.node_of(a) for a in actors))


def decide_within_groups(snapshot: LoadSnapshot, placement: Placement, caps: Capacities, cfg: PolicyParams,
                         groups: ExpertGroups) -> PlacementDecision:  # fmt: skip
    """`decide` under the group constraint (module docstring). One group: exactly `decide`."""
    if groups.num_groups == 1:
        return decide(snapshot, placement, caps, cfg)
    bad = groups.violations(placement)
    if bad:
        raise ValueError(f"placement breaks the expert groups: {bad[0]} ({len(bad)} in all)")
    W = np.asarray(snapshot.tokens, dtype=np.float64)
    nodes = list(caps.actor_nodes or placement.actor_nodes or (0,) * placement.num_actors)
    budget = None if cfg.byte_budget is None else cfg.byte_budget // groups.num_groups
    sub_cfg = replace(cfg, min_gain=0.0, byte_budget=budget)
    rows = [[list(a) for a in row] for row in placement.replicas]
    reasons = []
    for g, (experts, actors) in enumerate(zip(groups.experts, groups.actors)):
        sub = _sub_placement(placement, experts, actors)
        sub_caps = Capacities(caps.slots_per_actor, caps.bytes_per_expert, tuple(nodes[a] for a in actors),
                              caps.memory_slots_per_actor)
        d = decide(LoadSnapshot(snapshot.step, W[:, list(experts)]), sub, sub_caps, sub_cfg)
        for layer, row in enumerate(d.placement.replicas):
            for i, e in enumerate(experts):
                rows[layer][e] = [actors[a] for a in row[i]]
        reasons.append(f"group {g}: {d.reason}")
    new = placement.with_replicas(tuple(tuple(tuple(a) for a in row) for row in rows))
    loads0, loads1 = actor_loads(W, placement), actor_loads(W, new)
    max0, max1 = loads0.max(axis=1), loads1.max(axis=1)
    mean_total = float(loads0.mean(axis=1).sum())
    bal0 = mean_total / float(max0.sum()) if mean_total > 0 else 1.0
    bal1 = mean_total / float(max1.sum()) if mean_total > 0 else 1.0
    gain = (float(max0.sum()) - float(max1.sum())) / float(max0.sum()) if mean_total > 0 else 0.0
    moves = diff_moves(placement, new, nodes)
    counts = tuple(tuple(r) for r in placement.replica_counts())
    before = tuple(map(float, max0))
    if not moves or gain < max(cfg.min_gain, 1e-12):
        why = "no move" if not moves else f"predicted gain {gain:.2%} < min_gain {cfg.min_gain:.2%}"
        return PlacementDecision(placement, False, counts, (), bal0, bal0, 0,
                                 f"within {groups.num_groups} expert groups: {why}: kept", before, before)
    return PlacementDecision(
        placement=new, changed=True, replica_counts=tuple(tuple(r) for r in new.replica_counts()), moves=moves,
        balancedness_before=bal0, balancedness_after=bal1, bytes_to_move=bytes_moved(placement, new,
                                                                                       caps.bytes_per_expert),
        reason=f"within {groups.num_groups} expert groups, balancedness {bal0:.4f} -> {bal1:.4f}; "
               + "; ".join(reasons),
        layer_max_before=before, layer_max_after=tuple(map(float, max1)),
    )  # fmt: skip
