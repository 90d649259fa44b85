"""moe_runtime.runtime: Ray actors, the driver-side Cluster, placement and checkpoints.

`Cluster` (cluster.py) is the public entry point. Names are imported lazily: `dispatch/plan.py` imports
`runtime.placement`, so this package's import must stay free of Ray and of the model (no cycles, no Ray start-up
cost for code that only needs Placement).
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "Cluster": "moe_runtime.runtime.cluster",
    "ClusterError": "moe_runtime.runtime.cluster",
    "StepReport": "moe_runtime.runtime.cluster",
    "ClusterStartError": "moe_runtime.runtime.ray_env",
    "start_ray": "moe_runtime.runtime.ray_env",
    "pick_device": "moe_runtime.runtime.ray_env",
    "CheckpointError": "moe_runtime.runtime.checkpoint",
    "Placement": "moe_runtime.runtime.placement",
}

__all__ = ["CheckpointError", "Cluster", "ClusterError", "ClusterStartError", "Placement", "StepReport", "pick_device",
           "start_ray"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moe_runtime.runtime' has no attribute {name!r}")
