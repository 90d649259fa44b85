"""The scheduler inside the cluster's train loop: track load, decide every `every_steps`, migrate, measure.

The Cluster owns one `SchedulerHook` and calls `observe(cluster, step, expert_load)` after every step with the
[L, E] load the step's control-plane call already returned (no extra round trip). When scheduler.enabled, every
`every_steps` steps it looks at the EMA snapshot; if its imbalance under the current placement exceeds
`imbalance_threshold` it asks `policy.decide` and, if the decision changes the placement, applies it
(`migrate.apply_decision`). After a rebalance it sums the raw loads of the next `measure_steps` steps and reports
the balancedness MEASURED under the new placement next to the one the policy predicted.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moe_runtime.config import RuntimeConfig
from moe_runtime.placement import Placement
from moe_runtime.scheduler.load import LoadTracker, balancedness
from moe_runtime.scheduler.migrate import MigrationReport, apply_decision, moves_between
from moe_runtime.scheduler.policy import Capacities, PlacementDecision, PolicyParams, decide

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
        m = cfg.model
        self.num_layers, self.num_experts = m.num_layers, m.num_experts
        self.tracker = LoadTracker(self.num_layers, self.num_experts, self.sched.ema_decay, record=False)
        self.measure_steps = max(1, measure_steps)
        self.rebalances = 0
        self.bytes_moved = 0
        self.last_decision: PlacementDecision | None = None
        self.last_decision_str: str | None = None
        self.last_report: MigrationReport | None = None
        self.measured_balancedness: float | None = None
        self._acc: np.ndarray | None = None
        self._acc_steps = 0

    # ------------------------------------------------------------------ inputs

    def bytes_per_expert(self) -> int:
        """Weights + AdamW exp_avg + exp_avg_sq of one expert (float32): 3 x (d x 2f + f x d) x 4."""
        m = self.cfg.model
        return 3 * (m.hidden_size * 2 * m.ffn_hidden_size + m.ffn_hidden_size * m.hidden_size) * 4

    def capacities(self, placement: Placement) -> Capacities:
        slots = self.sched.slots_per_actor
        if slots is None:
            used = max(sum(a in actors for actors in row) for row in placement.replicas
                       for a in range(placement.num_actors))  # fmt: skip
            slots = max(math.ceil(placement.num_experts / placement.num_actors) + 1, used)
        return Capacities(slots, self.bytes_per_expert(), placement.actor_nodes)

    def params(self) -> PolicyParams:
        return PolicyParams.from_config(self.sched)

    # ------------------------------------------------------------------ train loop

    def observe(self, cluster: Any, step: int, load: Any) -> MigrationReport | None:
        """Record the load of `step`; every `every_steps` steps (when enabled) maybe rebalance."""
        arr = np.asarray(load.numpy() if hasattr(load, "numpy") else load, dtype=np.float64)
        last = self.tracker.last_step
        if last is not None and step <= last:  # a rollback or a restore: start the average again
            self.tracker = LoadTracker(self.num_layers, self.num_experts, self.sched.ema_decay, record=False)
        self.tracker.update(step, arr)
        if self._acc is not None:
            self._acc += arr
            self._acc_steps += 1
            if self._acc_steps >= self.measure_steps:
                self.measured_balancedness = balancedness(self._acc, cluster.placement)
                self._acc = None
        if self.sched.enabled and (step + 1) % self.sched.every_steps == 0:
            snap = self.tracker.snapshot()
            if snap.imbalance(cluster.placement) > self.sched.imbalance_threshold:
                return self.rebalance(cluster)
        return None

    def rebalance(
        self, cluster: Any, what: PlacementDecision | Placement | None = None
    ) -> MigrationReport | None:
        """Decide now from the load seen so far (None), or apply a given decision / placement. Returns the
        migration report, or None when the placement does not change."""
        old = cluster.placement
        if what is None:
            decision = decide(self.tracker.snapshot(), old, self.capacities(old), self.params())
        elif isinstance(what, PlacementDecision):
            decision = what
        elif isinstance(what, Placement):
            new = old.with_replicas(what.replicas)
            moves = moves_between(old, new)
            changed = bool(moves)
            if self.tracker.last_step is not None:
                tokens = self.tracker.snapshot().tokens
                b0, b1 = balancedness(tokens, old), balancedness(tokens, new)
            else:
                b0 = b1 = float("nan")
            copies = sum(m.kind != "drop" for m in moves)
            decision = PlacementDecision(
                new if changed else old,
                changed,
                tuple(map(tuple, new.replica_counts())),
                moves,
                b0,
                b1,
                copies * self.bytes_per_expert(),
                "placement given",
            )
        else:
            raise TypeError(
                f"rebalance({type(what).__name__}): expected a PlacementDecision, a Placement or None"
            )
        self.last_decision = decision
        self.last_decision_str = describe(decision, old.version)
        if not decision.changed:
            return None
        report = apply_decision(cluster, decision)
        self.last_report = report
        self.rebalances += 1
        self.bytes_moved += report.bytes_moved
        self.measured_balancedness = None
        self._acc = np.zeros((self.num_layers, self.num_experts))
        self._acc_steps = 0
        return report

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
