"""Replica anti-affinity across nodes (scheduler.replica_anti_affinity: node): pure placement repairs.

A node takes all its actors with it when it goes, so a replica on the same node as the expert's other replicas
does not protect against node loss. Two pure repairs over a Placement and the node of each actor:
- `spread_over_nodes`: every expert that already has >= 2 replicas but all of them on one node gets one replica
  (the last listed; the primary stays) moved to an actor on another node. Replica counts stay as they are: what the
  policy decided to replicate (the hot experts) is what gets protected, at no extra memory.
- `cross_node_replicas`: every expert of `keys` (default: all) whose replicas all sit on one node gets one more
  replica on another node (the full protection, one extra copy per such expert).
Both pick, on the other nodes, the actor with the fewest shards in that layer (then the lowest index), so the
layer's replica load stays even; both are idempotent. `node_loss_orphans` says what a node's loss would leave
with no replica.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from moe_runtime.placement import Placement, PlacementError, ShardKey

__all__ = ["cross_node_replicas", "node_loss_orphans", "single_node_replicated", "spread_over_nodes"]


def _nodes_of(placement: Placement, actor_nodes: Sequence[int] | None) -> list[int]:
    nodes = list(actor_nodes) if actor_nodes is not None else [placement.node_of(a) for a in
                                                                 range(placement.num_actors)]  # fmt: skip
    if len(nodes) != placement.num_actors:
        raise PlacementError(f"actor_nodes has {len(nodes)} entries: expected num_actors ({placement.num_actors})")
    return nodes


def _layer_counts(row: Sequence[Sequence[int]], num_actors: int) -> list[int]:
    counts = [0] * num_actors
    for actors in row:
        for a in actors:
            counts[a] += 1
    return counts


def _off_node_actor(actors: Sequence[int], nodes: Sequence[int], counts: Sequence[int]) -> int | None:
    """The least-loaded actor (shards in this layer, then index) on a node none of `actors` is on."""
    taken = {nodes[a] for a in actors}
    pool = [b for b in range(len(nodes)) if nodes[b] not in taken]
    return min(pool, key=lambda b: (counts[b], b)) if pool else None


def single_node_replicated(placement: Placement, actor_nodes: Sequence[int] | None = None) -> list[ShardKey]:
    """(layer, expert) with >= 2 replicas all on one node, where the cluster has more than one node."""
    nodes = _nodes_of(placement, actor_nodes)
    if len(set(nodes)) < 2:
        return []
    return [(layer, e) for layer, row in enumerate(placement.replicas) for e, actors in enumerate(row)
            if len(actors) >= 2 and len({nodes[a] for a in actors}) == 1]  # fmt: skip


def spread_over_nodes(placement: Placement, actor_nodes: Sequence[int] | None = None) -> Placement:
    """`placement` with every replicated expert spanning >= 2 nodes (one replica moved per expert that did not);
    the same object when nothing needs to move, else the next version."""
    nodes = _nodes_of(placement, actor_nodes)
    todo = single_node_replicated(placement, nodes)
    if not todo:
        return placement
    rows = [[tuple(a) for a in row] for row in placement.replicas]
    for layer, e in todo:
        actors = rows[layer][e]
        counts = _layer_counts(rows[layer], placement.num_actors)
        counts[actors[-1]] -= 1  # the replica that moves no longer counts where it was
        dst = _off_node_actor(actors, nodes, counts)
        if dst is not None:  # a node exists without any of its replicas (always, with >= 2 nodes)
            rows[layer][e] = (*actors[:-1], dst)
    return placement.with_replicas(tuple(tuple(r) for r in rows))


def cross_node_replicas(placement: Placement, actor_nodes: Sequence[int] | None = None,
                        keys: Iterable[ShardKey] | None = None) -> Placement:  # fmt: skip
    """`placement` with one replica added on another node for every expert of `keys` (default: every expert)
    whose replicas all sit on one node; the same object when none needs one (or the cluster has one node)."""
    nodes = _nodes_of(placement, actor_nodes)
    if len(set(nodes)) < 2:
        return placement
    wanted = None if keys is None else {(int(la), int(e)) for la, e in keys}
    rows = [[tuple(a) for a in row] for row in placement.replicas]
    changed = False
    for layer, row in enumerate(rows):
        for e, actors in enumerate(row):
            if (wanted is not None and (layer, e) not in wanted) or len({nodes[a] for a in actors}) > 1:
                continue
            dst = _off_node_actor(actors, nodes, _layer_counts(row, placement.num_actors))
            if dst is not None:
                row[e] = (*actors, dst)
                changed = True
    return placement.with_replicas(tuple(tuple(r) for r in rows)) if changed else placement


def node_loss_orphans(placement: Placement, node: int, actor_nodes: Sequence[int] | None = None) -> list[ShardKey]:
    """(layer, expert) whose every replica is on `node`: what losing that node leaves with no live copy."""
    nodes = _nodes_of(placement, actor_nodes)
    return [(layer, e) for layer, row in enumerate(placement.replicas) for e, actors in enumerate(row)
            if all(nodes[a] == node for a in actors)]  # fmt: skip
