"""Placement: which actors hold a replica of each (layer, expert). Versioned, serialisable, validated.

The bottom layer: pure, typed data with its own rules (the replica split, primary shards, diffs into moves, static
layouts), imported by the model, dispatch, runtime, scheduler and simulator alike. No torch, Ray or gRPC here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


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
