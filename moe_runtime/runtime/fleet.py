"""The expert fleet over Ray actor handles (scheduler/fleet.py's ExpertFleet): what migration calls, each
batch sent to every actor at once and then awaited actor by actor, so a failure names its actor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from moe_runtime.placement import Placement, ShardKey
from moe_runtime.scheduler.fleet import FleetCallError, ShardState

__all__ = ["RayExpertFleet"]

MIGRATE_TIMEOUT_S = 120.0


def _key(k: Sequence[int]) -> ShardKey:
    return (int(k[0]), int(k[1]))


class RayExpertFleet:
    """Expert actor and router worker handles (the Cluster's lists, shared) and the placement they run under."""

    def __init__(self, experts: list[Any], workers: list[Any], placement: Placement,
                 timeout_s: float = MIGRATE_TIMEOUT_S):  # fmt: skip
        self.experts = experts
        self.workers = workers
        self.placement = placement
        self.timeout_s = timeout_s
        self.phase = "done"  # of the training step in progress (runtime/step.py): "forward_backward" | "apply"

    def _each(self, refs: Mapping[int, Any]) -> dict[int, Any]:
        import ray

        out = {}
        for actor, ref in refs.items():
            try:
                out[actor] = ray.get(ref, timeout=self.timeout_s)
            except Exception as err:
                raise FleetCallError(actor, err) from err
        return out

    def read_shards(
        self, keys_by_actor: Mapping[int, Sequence[ShardKey]]
    ) -> dict[int, dict[ShardKey, ShardState]]:
        got = self._each({a: self.experts[a].state.remote(list(keys)) for a, keys in keys_by_actor.items()})
        return {a: {_key(k): d for k, d in states.items()} for a, states in got.items()}

    def load_shards(
        self, shards_by_actor: Mapping[int, Mapping[ShardKey, ShardState]], version: int
    ) -> dict[int, set[ShardKey]]:
        got = self._each({a: self.experts[a].load_shards.remote(dict(shards), version, replace=False)
                          for a, shards in shards_by_actor.items()})  # fmt: skip
        return {a: {_key(k) for k in hosted} for a, hosted in got.items()}

    def drop_shards(self, keys_by_actor: Mapping[int, Sequence[ShardKey]]) -> None:
        self._each({a: self.experts[a].drop_shards.remote(list(keys)) for a, keys in keys_by_actor.items()})

    def switch_placement(self, placement: Placement) -> None:
        import ray

        try:
            ray.get([a.set_placement_version.remote(placement.version) for a in self.experts],
                    timeout=self.timeout_s)
            ray.get([w.set_placement.remote(placement.to_dict()) for w in self.workers], timeout=self.timeout_s)
        except Exception as err:
            raise FleetCallError(None, err) from err
        self.placement = placement
