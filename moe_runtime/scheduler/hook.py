"""The scheduler's controller inside the train loop: track load, ask the trigger, decide, migrate, measure.

The Cluster owns one `SchedulerHook` and calls `observe(fleet, step, expert_load)` after every step with the
[L, E] load the step's control-plane call already returned (no extra round trip). The hook updates its EMA
tracker and feeds the snapshot to the pure trigger (`trigger.should_rebalance`); when that says so it asks
`policy.decide` and, if the decision changes the placement, applies it (`migrate.apply_decision`). After a
rebalance it sums the raw loads of the next `measure_steps` steps and reports the balancedness MEASURED under
the new placement next to the one the policy predicted.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from moe_runtime.config import RuntimeConfig
from moe_runtime.model.accounting import expert_state_bytes
from moe_runtime.placement import Placement, copies_between, diff_moves
from moe_runtime.scheduler.anti_affinity import spread_over_nodes
from moe_runtime.scheduler.fleet import ExpertFleet
from moe_runtime.scheduler.groups import decide_within_groups, routing_groups
from moe_runtime.scheduler.load import LoadTracker, balancedness
from moe_runtime.scheduler.migrate import MigrationReport, apply_decision
from moe_runtime.scheduler.policy import decide
from moe_runtime.scheduler.trigger import TriggerDecision, TriggerParams, should_rebalance
from moe_runtime.scheduler.types import Capacities, PlacementDecision, PolicyParams

__all__ = ["SchedulerHook", "describe"]

MEASURE_STEPS = 3


def describe(d: PlacementDecision, old_version: int | None = None) -> str:
    copies = sum(m.kind != "drop" for m in d.moves)
    head = f"v{old_version}->v{d.placement.version}" if old_version is not None else f"v{d.placement.version}"
    return (
        f"{head} {'changed' if d.changed else 'unchanged'}: {len(d.moves)} moves ({copies} copies), "
        f"{d.bytes_to_move} bytes, balancedness {d.balancedness_before:.4f} -> {d.balancedness_after:.4f} "
        f"predicted; {d.reason}"
    )


class SchedulerHook:
    def __init__(self, cfg: RuntimeConfig, measure_steps: int = MEASURE_STEPS):
        self.cfg = cfg
        self.sched = cfg.scheduler
        self.trigger = TriggerParams.from_config(cfg.scheduler)
        m = cfg.model
        self.num_layers, self.num_experts = m.num_layers, m.num_experts
        self.bytes_per_expert = expert_state_bytes(m)
        self.tracker = self._new_tracker()
        self.measure_steps = max(1, measure_steps)
        self.rebalances = 0
        self.bytes_moved = 0
        self.last_trigger: TriggerDecision | None = None
        self.last_decision: PlacementDecision | None = None
        self.last_decision_str: str | None = None
        self.last_report: MigrationReport | None = None
        self.measured_balancedness: float | None = None
        self._acc: np.ndarray | None = None
        self._acc_steps = 0

    def _new_tracker(self) -> LoadTracker:
        return LoadTracker(self.num_layers, self.num_experts, self.sched.ema_decay, record=False)

    # ------------------------------------------------------------------ inputs

    def capacities(self, placement: Placement) -> Capacities:
        slots = self.sched.slots_per_actor
        if slots is None:
            used = max(sum(a in actors for actors in row) for row in placement.replicas
                       for a in range(placement.num_actors))  # fmt: skip
            slots = max(math.ceil(placement.num_experts / placement.num_actors) + 1, used)
        return Capacities(slots, self.bytes_per_expert, placement.actor_nodes)

    def params(self) -> PolicyParams:
        return PolicyParams.from_config(self.sched)

    # ------------------------------------------------------------------ train loop

    def observe(self, fleet: ExpertFleet, step: int, load: Any) -> MigrationReport | None:
        """Record the [L, E] load of `step` (array-like); when the trigger says so, rebalance `fleet`."""
        arr = np.asarray(load, dtype=np.float64)
        last = self.tracker.last_step
        if last is not None and step <= last:  # a rollback or a restore: start the average again
            self.tracker = self._new_tracker()
        self.tracker.update(step, arr)
        if self._acc is not None:
            self._acc += arr
            self._acc_steps += 1
            if self._acc_steps >= self.measure_steps:
                self.measured_balancedness = balancedness(self._acc, fleet.placement)
                self._acc = None
        self.last_trigger = should_rebalance(self.tracker.snapshot(), fleet.placement, self.trigger)
        return self.rebalance(fleet) if self.last_trigger.rebalance else None

    def rebalance(
        self, fleet: ExpertFleet, what: PlacementDecision | Placement | None = None
    ) -> MigrationReport | None:
        """Decide now from the load seen so far (None), or apply a given decision / placement. Returns the
        migration report, or None when the placement does not change."""
        old = fleet.placement
        groups = routing_groups(self.cfg.model.routing, self.cfg.model.routing_groups, old)
        if what is None and groups is not None:  # grouped / node-limited: each group's experts stay on its actors
            decision = decide_within_groups(self.tracker.snapshot(), old, self.capacities(old), self.params(), groups)
        elif what is None:
            decision = decide(self.tracker.snapshot(), old, self.capacities(old), self.params())
        elif isinstance(what, PlacementDecision):
            decision = what
        elif isinstance(what, Placement):
            decision = self._given(old, what)
        else:
            raise TypeError(
                f"rebalance({type(what).__name__}): expected a PlacementDecision, a Placement or None"
            )
        if self.sched.replica_anti_affinity == "node" and groups is None:  # groups pin experts to their actors
            decision = self._spread(old, decision)
        if groups is not None and groups.violations(decision.placement):
            raise ValueError(f"placement breaks the {self.cfg.model.routing} routing's expert groups: "
                             f"{groups.violations(decision.placement)[0]}")
        self.last_decision = decision
        self.last_decision_str = describe(decision, old.version)
        if not decision.changed:
            return None
        report = apply_decision(fleet, decision)
        self.last_report = report
        self.rebalances += 1
        self.bytes_moved += report.bytes_moved
        self.measured_balancedness = None
        self._acc = np.zeros((self.num_layers, self.num_experts))
        self._acc_steps = 0
        return report

    def _spread(self, old: Placement, decision: PlacementDecision) -> PlacementDecision:
        """The decision with every replicated expert spanning two nodes (scheduler.replica_anti_affinity: node)."""
        spread = spread_over_nodes(decision.placement, old.actor_nodes or None)
        if spread is decision.placement:
            return decision
        out = self._given(old, spread)
        return replace(out, reason=f"{decision.reason}; replicas spread over nodes (replica_anti_affinity: node)")

    def _given(self, old: Placement, given: Placement) -> PlacementDecision:
        """A decision that moves to the replicas of `given` (as the next version of `old`)."""
        new = old.with_replicas(given.replicas)
        moves = diff_moves(old, new)
        changed = bool(moves)
        if self.tracker.last_step is not None:
            tokens = self.tracker.snapshot().tokens
            b0, b1 = balancedness(tokens, old), balancedness(tokens, new)
        else:
            b0 = b1 = float("nan")
        return PlacementDecision(
            new if changed else old,
            changed,
            tuple(map(tuple, new.replica_counts())),
            moves,
            b0,
            b1,
            copies_between(old, new) * self.bytes_per_expert,
            "placement given",
        )

    # ------------------------------------------------------------------ reporting

    def status(self, placement: Placement) -> dict[str, Any]:
        d = self.last_decision
        imb = self.tracker.snapshot().imbalance(placement) if self.tracker.last_step is not None else None
        predicted = measured = None
        if d is not None and d.balancedness_before > 0:
            predicted = d.balancedness_after / d.balancedness_before - 1.0
            if self.measured_balancedness is not None:
                measured = self.measured_balancedness / d.balancedness_before - 1.0
        return {
            "enabled": self.sched.enabled,
            "imbalance": imb,
            "last_decision": self.last_decision_str,
            "predicted_gain": predicted,
            "measured_gain": measured,
            "measured_balancedness": self.measured_balancedness,
            "rebalances": self.rebalances,
            "bytes_moved": self.bytes_moved,
            "last_migration_s": self.last_report.seconds if self.last_report else None,
        }
