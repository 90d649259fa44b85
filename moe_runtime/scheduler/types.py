"""The placement policy's inputs and output: what the cluster can hold, the policy's knobs, its decision."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moe_runtime.placement import Move, Placement

if TYPE_CHECKING:
    from moe_runtime.config import SchedulerConfig

__all__ = ["Capacities", "PlacementDecision", "PolicyParams"]


@dataclass(frozen=True)
class Capacities:
    """What the cluster can hold and what moving costs.

    slots_per_actor: expert replicas an actor can hold per layer.
    bytes_per_expert: bytes to copy one expert replica (weights + optimizer state, e.g. AdamW m and v).
    actor_nodes: node of each actor; () = take the placement's.
    memory_slots_per_actor: replicas an actor can hold over all layers (its memory, in expert slots);
        None = num_layers * slots_per_actor (no limit beyond the per-layer one).
    """

    slots_per_actor: int
    bytes_per_expert: int
    actor_nodes: tuple[int, ...] = ()
    memory_slots_per_actor: int | None = None

    def __post_init__(self) -> None:
        if self.slots_per_actor <= 0:
            raise ValueError(f"slots_per_actor = {self.slots_per_actor}: must be > 0")
        if self.bytes_per_expert < 0:
            raise ValueError(f"bytes_per_expert = {self.bytes_per_expert}: must be >= 0")
        if self.memory_slots_per_actor is not None and self.memory_slots_per_actor <= 0:
            raise ValueError(f"memory_slots_per_actor = {self.memory_slots_per_actor}: must be > 0")
        object.__setattr__(self, "actor_nodes", tuple(int(n) for n in self.actor_nodes))

    @classmethod
    def from_memory(
        cls,
        slots_per_actor: int,
        bytes_per_expert: int,
        memory_bytes_per_actor: int,
        actor_nodes: Sequence[int] = (),
    ) -> Capacities:
        """Memory given in bytes: it holds memory_bytes_per_actor // bytes_per_expert replicas."""
        if bytes_per_expert <= 0:
            raise ValueError(f"bytes_per_expert = {bytes_per_expert}: must be > 0 to convert memory to slots")
        return cls(
            slots_per_actor, bytes_per_expert, tuple(actor_nodes), memory_bytes_per_actor // bytes_per_expert
        )


@dataclass(frozen=True)
class PolicyParams:
    """min_gain: smallest predicted relative drop of sum_l max actor load worth acting on.
    byte_budget: most bytes copied per decision (None = unlimited).
    max_replicas_per_expert: cap on replicas of one expert (None = number of actors).
    min_gain_per_copy: the price of one expert copy: it must lower its layer's max actor load by at least
        this fraction of the layer's mean actor load (0 = chase any gain regardless of bytes)."""

    min_gain: float = 0.05
    byte_budget: int | None = None
    max_replicas_per_expert: int | None = None
    min_gain_per_copy: float = 0.01

    def __post_init__(self) -> None:
        if not self.min_gain >= 0:
            raise ValueError(f"min_gain = {self.min_gain}: must be >= 0")
        if not self.min_gain_per_copy >= 0:
            raise ValueError(f"min_gain_per_copy = {self.min_gain_per_copy}: must be >= 0")
        if self.byte_budget is not None and self.byte_budget < 0:
            raise ValueError(f"byte_budget = {self.byte_budget}: must be >= 0 or None")
        if self.max_replicas_per_expert is not None and self.max_replicas_per_expert < 1:
            raise ValueError(f"max_replicas_per_expert = {self.max_replicas_per_expert}: must be >= 1")

    @classmethod
    def from_config(cls, cfg: SchedulerConfig, max_replicas_per_expert: int | None = None) -> PolicyParams:
        return cls(
            min_gain=cfg.min_gain,
            byte_budget=int(cfg.byte_budget_mb * 2**20),
            max_replicas_per_expert=max_replicas_per_expert,
            min_gain_per_copy=cfg.min_gain_per_copy,
        )


@dataclass(frozen=True)
class PlacementDecision:
    placement: Placement  # the input placement itself when unchanged; else version + 1
    changed: bool
    replica_counts: tuple[tuple[int, ...], ...]  # [layer][expert] of `placement`
    moves: tuple[Move, ...]
    balancedness_before: float
    balancedness_after: float
    bytes_to_move: int
    reason: str
    layer_max_before: tuple[float, ...] = field(default=())
    layer_max_after: tuple[float, ...] = field(default=())
