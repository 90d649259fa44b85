"""When to rebalance: a pure function of the load snapshot, the placement it is measured under and the
trigger's parameters (like Ray Serve's autoscaling policy); the controller (hook.py) feeds it and acts on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from moe_runtime.placement import Placement
from moe_runtime.scheduler.load import LoadSnapshot

if TYPE_CHECKING:
    from moe_runtime.config import SchedulerConfig

__all__ = ["TriggerDecision", "TriggerParams", "should_rebalance"]


@dataclass(frozen=True)
class TriggerParams:
    """enabled: rebalance at all; every_steps: look after every this many steps (after step s with
    (s + 1) % every_steps == 0); imbalance_threshold: ask the policy when sum_l max / sum_l mean actor load
    exceeds this."""

    enabled: bool = False
    every_steps: int = 10
    imbalance_threshold: float = 1.15

    def __post_init__(self) -> None:
        if self.every_steps <= 0:
            raise ValueError(f"every_steps = {self.every_steps}: must be > 0")
        if not self.imbalance_threshold >= 1.0:
            raise ValueError(f"imbalance_threshold = {self.imbalance_threshold}: must be >= 1")

    @classmethod
    def from_config(cls, cfg: SchedulerConfig) -> TriggerParams:
        return cls(cfg.enabled, cfg.every_steps, cfg.imbalance_threshold)


@dataclass(frozen=True)
class TriggerDecision:
    rebalance: bool  # ask the policy for a decision now
    reason: str
    imbalance: float | None = None  # of the snapshot under the placement; None when not looked at


def should_rebalance(snapshot: LoadSnapshot, placement: Placement, params: TriggerParams) -> TriggerDecision:
    """Whether the load at `snapshot.step` (the EMA after that step) calls for a rebalance under `placement`."""
    if not params.enabled:
        return TriggerDecision(False, "scheduler disabled")
    if (snapshot.step + 1) % params.every_steps:
        return TriggerDecision(False, f"step {snapshot.step}: looks only every {params.every_steps} steps")
    imb = snapshot.imbalance(placement)
    if imb > params.imbalance_threshold:
        return TriggerDecision(True, f"imbalance {imb:.4f} > threshold {params.imbalance_threshold}", imb)
    return TriggerDecision(False, f"imbalance {imb:.4f} <= threshold {params.imbalance_threshold}", imb)
