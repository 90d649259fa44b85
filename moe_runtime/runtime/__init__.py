"""moe_runtime.runtime: the Ray actors (expert actors, router workers) and the driver-side Cluster.

`Cluster` (runtime/cluster.py) is the public entry point. This package's import loads nothing (no Ray start-up cost
for code that only needs one submodule).
"""
