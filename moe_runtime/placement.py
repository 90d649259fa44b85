"""Placement: which actors hold a replica of each (layer, expert). Versioned, serialisable, validated.

The bottom layer: pure, typed data with its own rules (the replica split, primary shards, diffs into moves, static
layouts), imported by the model, dispatch, runtime, scheduler and simulator alike. No torch, Ray or gRPC here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

ShardKey = tuple[int, int]  # (layer, expert): one expert shard
MoveKind = Literal["replicate", "move", "drop"]


class PlacementError(ValueError):
    pass


def split_over_replicas(
    expert_counts: list[int], replicas: tuple[tuple[int, ...], ...]
) -> list[tuple[int, int, int]]:
    """(actor, expert, rows) pieces, sorted by (actor, expert): each expert's rows split evenly over its replicas.

    Replica i of R gets n // R rows, plus one for i < n % R. Pure and cheap: the simulator calls it on token
    counts for thousands of (worker, layer) pairs, and DispatchPlan.build uses it on real tokens.
    """
    pieces = []
    for expert, n in enumerate(expert_counts):
        actors = replicas[expert]
        base, extra = divmod(n, len(actors))
        for i, actor in enumerate(actors):
            c = base + (i < extra)
            if c:
                pieces.append((actor, expert, c))
    pieces.sort()
    return pieces


def expected_actor_loads(
    expert_loads: Sequence[float], replicas: tuple[tuple[int, ...], ...], num_actors: int
) -> list[float]:
    """Load per actor of one layer with each expert's load divided evenly over its replicas: the mean of
    split_over_replicas' rows (its per-actor sums exactly when every replica count divides its count, within
    one row per replicated expert otherwise), defined for real-valued loads such as the scheduler's EMA."""
    loads = [0.0] * num_actors
    for expert, actors in enumerate(replicas):
        share = expert_loads[expert] / len(actors)
        for a in actors:
            loads[a] += share
    return loads


@dataclass(frozen=True)
class Placement:
    """replicas[layer][expert] = tuple of actor indices holding that expert (>= 1, no duplicates)."""

    num_actors: int
    replicas: tuple[tuple[tuple[int, ...], ...], ...]
    version: int = 0
    actor_nodes: tuple[int, ...] = field(default=())  # node index of each actor; () = all on node 0

    def __post_init__(self) -> None:
        if self.num_actors <= 0:
            raise PlacementError(f"num_actors = {self.num_actors}: must be > 0")
        if not self.replicas:
            raise PlacementError("replicas: must list at least one layer")
        num_experts = len(self.replicas[0])
        for layer, row in enumerate(self.replicas):
            if len(row) != num_experts:
                raise PlacementError(
                    f"replicas[{layer}] has {len(row)} experts: expected {num_experts} like layer 0"
                )
            for expert, actors in enumerate(row):
                if not actors:
                    raise PlacementError(f"replicas[{layer}][{expert}] is empty: every expert needs a replica")
                if len(set(actors)) != len(actors):
                    raise PlacementError(f"replicas[{layer}][{expert}] = {list(actors)}: duplicate actor")
                for a in actors:
                    if not 0 <= a < self.num_actors:
                        raise PlacementError(
                            f"replicas[{layer}][{expert}] = {list(actors)}: actor {a} not in [0, {self.num_actors})"
                        )
        if self.actor_nodes and len(self.actor_nodes) != self.num_actors:
            raise PlacementError(
                f"actor_nodes has {len(self.actor_nodes)} entries: expected num_actors ({self.num_actors})"
            )

    # ------------------------------------------------------------------ construction

    @classmethod
    def contiguous(
        cls, num_layers: int, num_experts: int, num_actors: int, actor_nodes: tuple[int, ...] = ()
    ) -> Placement:
        """Expert e of every layer on actor e * A // E: contiguous blocks, no replicas (the static default)."""
        row = tuple((e * num_actors // num_experts,) for e in range(num_experts))
        return cls(num_actors=num_actors, replicas=(row,) * num_layers, actor_nodes=actor_nodes)

    @classmethod
    def expert_data_parallel(
        cls, num_layers: int, num_experts: int, num_actors: int, actor_nodes: tuple[int, ...] = ()
    ) -> Placement:
        """The static layout for any number of actors: `contiguous` when actors <= experts; with more actors than
        experts, expert e on actors e, e + E, e + 2E, ... (Megatron's expert-parallel group of E with expert data
        parallelism), so every actor holds exactly one expert per layer."""
        if num_actors <= num_experts:
            return cls.contiguous(num_layers, num_experts, num_actors, actor_nodes)
        row = tuple(tuple(range(e, num_actors, num_experts)) for e in range(num_experts))
        return cls(num_actors=num_actors, replicas=(row,) * num_layers, actor_nodes=actor_nodes)

    # ------------------------------------------------------------------ queries

    @property
    def num_layers(self) -> int:
        return len(self.replicas)

    @property
    def num_experts(self) -> int:
        return len(self.replicas[0])

    def node_of(self, actor: int) -> int:
        return self.actor_nodes[actor] if self.actor_nodes else 0

    def shards_of(self, actor: int) -> list[tuple[int, int]]:
        """(layer, expert) pairs hosted by `actor`, sorted."""
        return [
            (layer, e)
            for layer, row in enumerate(self.replicas)
            for e, actors in enumerate(row)
            if actor in actors
        ]

    def replica_counts(self) -> list[list[int]]:
        return [[len(a) for a in row] for row in self.replicas]

    def primary_of(self, layer: int, expert: int) -> int:
        """The actor that answers for (layer, expert) where one replica must speak for all (grad norms,
        checkpoints, reading weights): its first listed replica."""
        return self.replicas[layer][expert][0]

    def primary_shards(self) -> list[list[ShardKey]]:
        """Per actor, the (layer, expert) pairs it is the primary of, sorted; every pair appears exactly once."""
        out: list[list[ShardKey]] = [[] for _ in range(self.num_actors)]
        for layer, row in enumerate(self.replicas):
            for e in range(len(row)):
                out[self.primary_of(layer, e)].append((layer, e))
        return out

    def with_replicas(self, replicas: tuple[tuple[tuple[int, ...], ...], ...]) -> Placement:
        """A new placement with the next version number."""
        return Placement(self.num_actors, replicas, self.version + 1, self.actor_nodes)

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "num_actors": self.num_actors,
            "actor_nodes": list(self.actor_nodes),
            "replicas": [[list(a) for a in row] for row in self.replicas],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Placement:
        try:
            return cls(
                num_actors=int(d["num_actors"]),
                replicas=tuple(tuple(tuple(int(a) for a in actors) for actors in row) for row in d["replicas"]),
                version=int(d.get("version", 0)),
                actor_nodes=tuple(int(n) for n in d.get("actor_nodes", ())),
            )
        except (KeyError, TypeError) as err:
            raise PlacementError(f"placement dict is malformed: {err!r}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> Placement:
        return cls.from_dict(json.loads(s))


# ---------------------------------------------------------------------------------------------------- diffs


@dataclass(frozen=True)
class Move:
    """One replica change. kind:
    - "replicate": copy expert from src_actor (a holder before the change) to dst_actor;
    - "move": copy from src_actor to dst_actor, then src_actor drops it;
    - "drop": dst_actor frees its replica (src_actor is None; no bytes).
    Apply copies before drops: every source still holds the expert when it is copied."""

    layer: int
    expert: int
    src_actor: int | None
    dst_actor: int
    kind: MoveKind


def _check_same_shape(old: Placement, new: Placement) -> None:
    if (old.num_layers, old.num_experts, old.num_actors) != (new.num_layers, new.num_experts, new.num_actors):
        raise PlacementError(
            f"placements differ in shape: {old.num_layers}x{old.num_experts} on {old.num_actors} actors vs "
            f"{new.num_layers}x{new.num_experts} on {new.num_actors}"
        )


def diff_moves(old: Placement, new: Placement, actor_nodes: Sequence[int] = ()) -> tuple[Move, ...]:
    """The moves that turn `old` into `new`, per (layer, expert) in order.

    THE rule for copy sources: each new replica (destinations in ascending order) is copied from an old holder,
    first from one that loses the expert (a "move": it drops its replica after the copy), else from one that
    keeps it ("replicate"); among those, one on the destination's node (`actor_nodes`, default old's) first,
    then the lowest index. Old replicas no copy took are dropped ("drop")."""
    _check_same_shape(old, new)
    nodes = list(actor_nodes) or [old.node_of(a) for a in range(old.num_actors)]
    moves: list[Move] = []
    for layer, (old_row, new_row) in enumerate(zip(old.replicas, new.replicas)):
        for e, (old_a, new_a) in enumerate(zip(old_row, new_row)):
            removed = sorted(set(old_a) - set(new_a))
            added = sorted(set(new_a) - set(old_a))
            kept = sorted(set(old_a) & set(new_a))
            for b in added:
                if removed:
                    same = [a for a in removed if nodes[a] == nodes[b]]
                    src = (same or removed)[0]
                    removed.remove(src)
                    moves.append(Move(layer, e, src, b, "move"))
                else:
                    pool = kept or sorted(old_a)
                    same = [a for a in pool if nodes[a] == nodes[b]]
                    moves.append(Move(layer, e, (same or pool)[0], b, "replicate"))
            for a in removed:
                moves.append(Move(layer, e, None, a, "drop"))
    return tuple(moves)


def copies_between(old: Placement, new: Placement) -> int:
    """Replicas in `new` that `old` does not have: the copies (moves and replicates) of diff_moves(old, new)."""
    _check_same_shape(old, new)
    copies = 0
    for old_row, new_row in zip(old.replicas, new.replicas):
        for old_actors, new_actors in zip(old_row, new_row):
            copies += len(set(new_actors) - set(old_actors))
    return copies
