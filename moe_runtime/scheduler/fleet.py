"""The expert fleet as migration sees it: the actors holding expert shards, the router workers that route to
them, and the placement they all run under. runtime/fleet.py implements it over Ray actor handles; tests use
an in-memory fake. Every call takes a batch per actor so an implementation can run the actors concurrently."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from moe_runtime.placement import Placement, ShardKey

__all__ = ["ExpertFleet", "FleetCallError", "ShardState"]

# One expert replica's state: "w1", "w2" and their AdamW state ("w1.exp_avg", "w1.exp_avg_sq", "w1.step", ...)
ShardState = Mapping[str, torch.Tensor]


class FleetCallError(RuntimeError):
    """A fleet call failed on `actor` (None: on the fleet as a whole); the message is the cause's."""

    def __init__(self, actor: int | None, cause: BaseException):
        super().__init__(str(cause))
        self.actor = actor
        self.cause = cause


class ExpertFleet(Protocol):
    """Each call raises FleetCallError naming the actor whose part failed."""

    @property
    def placement(self) -> Placement:
        """The placement every actor and router worker runs under now."""
        ...

    def read_shards(
        self, keys_by_actor: Mapping[int, Sequence[ShardKey]]
    ) -> dict[int, dict[ShardKey, ShardState]]:
        """Copies of the state of these shards, per actor that holds them."""
        ...

    def load_shards(
        self, shards_by_actor: Mapping[int, Mapping[ShardKey, ShardState]], version: int
    ) -> dict[int, set[ShardKey]]:
        """Add shards to actors (shards an actor already holds keep their state; grads start at zero), which
        then serve placement `version`; returns the shards each of those actors holds afterwards."""
        ...

    def drop_shards(self, keys_by_actor: Mapping[int, Sequence[ShardKey]]) -> None:
        """Free these shards (weights and optimizer state) on these actors."""
        ...

    def switch_placement(self, placement: Placement) -> None:
        """Every actor serves `placement.version`, every router worker routes by `placement`; afterwards
        `self.placement` is `placement`."""
        ...
