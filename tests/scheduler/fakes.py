"""An in-memory expert fleet (scheduler/fleet.py's ExpertFleet) for migration and hook tests: per actor a dict
of shard states, the placement version each actor serves and the placement each router worker routes by."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from moe_runtime.placement import Placement, ShardKey
from moe_runtime.scheduler.fleet import FleetCallError, ShardState


def shard_state(layer: int, expert: int) -> dict[str, torch.Tensor]:
    """A distinct state per (layer, expert): weights, AdamW moments and step."""
    base = float(100 * layer + expert)
    return {"w1": torch.full((2, 4), base), "w2": torch.full((2, 2), -base), "w1.exp_avg": torch.full((2, 4), 0.5),
            "w1.exp_avg_sq": torch.full((2, 4), base + 0.25), "w1.step": torch.tensor(7.0)}  # fmt: skip


class FakeFleet:
    def __init__(self, placement: Placement, num_workers: int = 2):
        self.placement = placement
        self.shards: list[dict[ShardKey, dict[str, torch.Tensor]]] = [
            {k: shard_state(*k) for k in placement.shards_of(a)} for a in range(placement.num_actors)
        ]
        self.versions = [placement.version] * placement.num_actors
        self.worker_placements = [placement] * num_workers
        self.calls: list[tuple[str, int | None]] = []  # (operation, actor) in the order they ran
        self.fail: set[tuple[str, int | None]] = set()  # (operation, actor) that raise

    def _call(self, op: str, actor: int | None) -> None:
        self.calls.append((op, actor))
        if (op, actor) in self.fail:
            raise FleetCallError(actor, RuntimeError(f"{op} failed on purpose"))

    def read_shards(self, keys_by_actor: Mapping[int, Sequence[ShardKey]]) -> dict[int, dict[ShardKey, ShardState]]:
        out = {}
        for a, keys in keys_by_actor.items():
            self._call("read", a)
            out[a] = {k: {n: t.clone() for n, t in self.shards[a][k].items()} for k in keys}
        return out

    def load_shards(self, shards_by_actor: Mapping[int, Mapping[ShardKey, ShardState]], version: int
                    ) -> dict[int, set[ShardKey]]:  # fmt: skip
        out = {}
        for a, shards in shards_by_actor.items():
            self._call("load", a)
            for k, d in shards.items():
                self.shards[a].setdefault(k, {n: t.clone() for n, t in d.items()})
            self.versions[a] = version
            out[a] = set(self.shards[a])
        return out

    def drop_shards(self, keys_by_actor: Mapping[int, Sequence[ShardKey]]) -> None:
        for a, keys in keys_by_actor.items():
            self._call("drop", a)
            for k in keys:
                del self.shards[a][k]

    def switch_placement(self, placement: Placement) -> None:
        self._call("switch", None)
        self.versions = [placement.version] * placement.num_actors
        self.worker_placements = [placement] * len(self.worker_placements)
        self.placement = placement
