"""The policy's working state of one layer (hosts per expert, experts per actor, loads) and the limits and
objective that every search stage shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moe_runtime.placement import expected_actor_loads

__all__ = ["Change", "LayerState", "SlotLimits", "memory_left", "objective", "tolerance"]

# A change is a tuple of (expert, actor, +1 add / -1 remove).
Change = tuple[tuple[int, int, int], ...]


class LayerState:
    """Mutable working state of one layer: hosts per expert, experts per actor, loads (each expert's load split
    evenly over its replicas, placement.expected_actor_loads), and `copies`: replicas not held before the
    decision (`orig`), each of which costs bytes_per_expert."""

    __slots__ = ("copies", "hosts", "loads", "mean", "num_actors", "on", "order", "orig", "sumsq", "w")

    def __init__(
        self,
        w: Sequence[float],
        hosts: Sequence[Sequence[int]],
        num_actors: int,
        orig: Sequence[frozenset[int]],
    ):
        self.w = [float(x) for x in w]
        self.num_actors = num_actors
        self.hosts = [sorted(h) for h in hosts]
        self.orig = list(orig)
        self.on: list[list[int]] = [[] for _ in range(num_actors)]
        for e, h in enumerate(self.hosts):
            for a in h:
                self.on[a].append(e)
        self.mean = sum(self.w) / num_actors
        self.copies = self.new_copies()
        self._recompute()

    def _recompute(self) -> None:
        self.loads = expected_actor_loads(self.w, self.hosts, self.num_actors)
        self.sumsq = sum(x * x for x in self.loads)
        self.order = sorted(range(self.num_actors), key=lambda a: (-self.loads[a], a))

    def copy(self) -> LayerState:
        return LayerState(self.w, self.hosts, self.num_actors, self.orig)

    @property
    def max(self) -> float:
        return self.loads[self.order[0]]

    def used(self, a: int) -> int:
        return len(self.on[a])

    def new_copies(self) -> int:
        return sum(1 for e, h in enumerate(self.hosts) for a in h if a not in self.orig[e])

    def apply(self, change: Change) -> None:
        self.copies += self.byte_delta(change)
        for e, a, s in change:
            if s > 0:
                self.hosts[e].append(a)
                self.hosts[e].sort()
                self.on[a].append(e)
                self.on[a].sort()
            else:
                self.hosts[e].remove(a)
                self.on[a].remove(e)
        self._recompute()

    def byte_delta(self, change: Change) -> int:
        """Change in the number of replicas not present before the decision."""
        return sum(s for e, a, s in change if a not in self.orig[e])

    def rows(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(h) for h in self.hosts)


@dataclass
class SlotLimits:
    cap: list[int]  # slots per actor in this layer
    max_rep: int
    mem_left: list[int] | None  # free memory slots per actor (shared over layers); None = unchecked

    def slot_ok(self, layer: LayerState, change: Change) -> bool:
        net: dict[int, int] = {}
        for _, a, s in change:
            net[a] = net.get(a, 0) + s
        for a, n in net.items():
            if n > 0:
                if layer.used(a) + n > self.cap[a]:
                    return False
                if self.mem_left is not None and n > self.mem_left[a]:
                    return False
        return True


def tolerance(layer: LayerState) -> float:
    """Float noise in a layer's max load: changes smaller than this are no change."""
    return 1e-9 * max(1.0, layer.max)


def objective(layers: Sequence[LayerState], price: float) -> float:
    """sum_l (max load + price x layer mean x copies): a copy must lower its layer's max by price x mean."""
    return sum(l.max + price * l.mean * l.copies for l in layers)


def memory_left(layers: Sequence[LayerState], limit: int | None) -> list[int] | None:
    """Free memory slots per actor over all layers (None when memory is not limited)."""
    if limit is None:
        return None
    A = layers[0].num_actors
    return [limit - sum(l.used(a) for l in layers) for a in range(A)]
