"""The load part of `Cluster.status()`: token copies each expert actor served per (layer, expert) since it started
(forward passes: training and inference), summed into per-expert and per-(layer, actor) tables, and the
(layer, expert) -> actors map of the placement. Actors that do not answer count as 0 and are listed."""

from __future__ import annotations

from typing import Any


def load_tables(cluster: Any, timeout_s: float = 10.0) -> dict[str, Any]:
    import ray

    m = cluster.cfg.model
    L, E, A = m.num_layers, m.num_experts, len(cluster.experts)
    expert_le = [[0] * E for _ in range(L)]
    actor_la = [[0] * A for _ in range(L)]
    silent = []
    for i, a in enumerate(cluster.experts):
        try:
            counts = ray.get(a.token_counts.remote(), timeout=timeout_s)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            silent.append(i)
            continue
        for (layer, expert), n in counts.items():
            if 0 <= layer < L and 0 <= expert < E:
                expert_le[layer][expert] += int(n)
                actor_la[layer][i] += int(n)
    expert_map = {f"{layer},{e}": list(actors) for layer, row in enumerate(cluster.placement.replicas)
                  for e, actors in enumerate(row)}
    return {"expert_load": expert_le, "actor_load_per_layer": actor_la, "expert_map": expert_map,
            "load_unreported_actors": silent}
