"""Where router workers and expert actors run, and the static placement the simulator starts from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from moe_runtime.config import RuntimeConfig
from moe_runtime.placement import Placement

__all__ = ["INTER_NODE", "INTRA_NODE", "LOOPBACK", "Layout", "SimError", "static_placement"]

# Link classes, in the order of hardware.LINK_CLASSES.
LOOPBACK, INTRA_NODE, INTER_NODE = 0, 1, 2


class SimError(ValueError):
    pass


@dataclass(frozen=True, eq=False)
class Layout:
    """Where router workers and expert actors run. Devices are GPUs (or processes, with a host table).

    - ``colocated``: GPU g runs router worker g and expert actor g (like Megatron EP): W = A = GPUs.
    - ``separate``: expert actors on GPUs [0, A), router workers on GPUs [A, A + W) (the runtime's processes
      each on their own GPU).
    Nodes: device // gpus_per_node.
    """

    kind: Literal["colocated", "separate"]
    worker_device: np.ndarray
    actor_device: np.ndarray
    num_devices: int
    gpus_per_node: int

    @classmethod
    def colocated(cls, gpus: int, gpus_per_node: int = 8) -> Layout:
        d = np.arange(gpus)
        return cls("colocated", d, d.copy(), gpus, gpus_per_node)

    @classmethod
    def separate(cls, workers: int, actors: int, gpus_per_node: int = 8) -> Layout:
        return cls("separate", np.arange(actors, actors + workers), np.arange(actors), actors + workers,
                   gpus_per_node)  # fmt: skip

    @property
    def num_workers(self) -> int:
        return len(self.worker_device)

    @property
    def num_actors(self) -> int:
        return len(self.actor_device)

    @property
    def num_nodes(self) -> int:
        return (self.num_devices - 1) // self.gpus_per_node + 1

    def actor_nodes(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.actor_device // self.gpus_per_node)

    def spans_nodes(self, devices: np.ndarray) -> bool:
        """Whether these devices sit on more than one node."""
        return len(np.unique(np.asarray(devices) // self.gpus_per_node)) > 1

    def link_class(self) -> np.ndarray:
        """[W, A] link class of worker w <-> actor a: 0 same device, 1 same node, 2 across nodes."""
        wd, ad = self.worker_device[:, None], self.actor_device[None, :]
        same_node = (wd // self.gpus_per_node) == (ad // self.gpus_per_node)
        return np.where(wd == ad, LOOPBACK, np.where(same_node, INTRA_NODE, INTER_NODE)).astype(np.int8)

    @classmethod
    def from_config(cls, cfg: RuntimeConfig) -> Layout:
        """The GPU cluster a config's `sim` section describes: `sim.layout` ("auto" = colocated when
        router_workers == expert_actors == sim.gpus, else separate)."""
        c, s = cfg.cluster, cfg.sim
        W, A = c.router_workers, c.expert_actors
        kind = s.layout
        if kind == "auto":
            kind = "colocated" if W == A == s.gpus else "separate"
        if kind == "colocated":
            if not W == A == s.gpus:
                raise SimError(
                    f"sim layout colocated needs cluster.router_workers = cluster.expert_actors = sim.gpus, got "
                    f"{W}, {A}, {s.gpus}"
                )
            return cls.colocated(s.gpus, s.gpus_per_node)
        if kind != "separate":
            raise SimError(f"sim.layout = {kind!r}: expected auto, colocated or separate")
        if W + A > s.gpus:
            raise SimError(f"separate layout: {A} expert actors + {W} router workers need {W + A} GPUs, "
                           f"sim.gpus = {s.gpus}")  # fmt: skip
        return cls.separate(W, A, s.gpus_per_node)

    @classmethod
    def local_cluster(cls, cfg: RuntimeConfig) -> Layout:
        """The config's local cluster on this machine: its processes side by side on one node."""
        W, A = cfg.cluster.router_workers, cfg.cluster.expert_actors
        return cls.separate(W, A, gpus_per_node=W + A)


def static_placement(num_layers: int, num_experts: int, num_actors: int, actor_nodes: tuple[int, ...] = ()
                     ) -> Placement:  # fmt: skip
    """The static layout: ``Placement.contiguous`` when actors <= experts; with more actors than experts, expert e
    on actors e, e + E, e + 2E, ... (Megatron's expert-parallel group of E with expert data parallelism), so
    every actor holds exactly one expert per layer."""
    if num_actors <= num_experts:
        return Placement.contiguous(num_layers, num_experts, num_actors, actor_nodes)
    row = tuple(tuple(range(e, num_actors, num_experts)) for e in range(num_experts))
    return Placement(num_actors, (row,) * num_layers, actor_nodes=actor_nodes)
