"""One set of cluster processes for the runs of a benchmark that share a layout: `ClusterReuse.start(cfg)` starts a
cluster, or re-initialises the previous one for `cfg` (Cluster.restart, runtime/relaunch.py: a fresh cluster's
state, the oracle's initial weights of `cfg`, on the same processes) when the layout is the same. A party start
costs ~1.6-2.5 CPU-s here, a re-initialisation ~0.1 (docs/measurements.md, `make bench` in one process, wave 6).
A fresh cluster builds its optimizers at once (Cluster.prepare_training), as re-initialised processes that trained
before have them ready: the first run's first step then costs what every other run's does.

    reuse = ClusterReuse()
    try:
        for cfg in configs:
            cluster = reuse.start(cfg)
            ...
    finally:
        reuse.close()
"""

from __future__ import annotations

from typing import Any


class ClusterReuse:
    def __init__(self) -> None:
        self.cluster: Any = None  # runtime.cluster.Cluster, the one last started or restarted
        self.starts = 0  # cluster starts (new processes)
        self.restarts = 0  # re-initialisations on running processes

    def start(self, cfg: Any) -> Any:
        """A cluster for `cfg` at step 0: the previous one restarted when its layout matches, else a new one (the
        previous one shut down first)."""
        from moe_runtime.runtime.cluster import Cluster
        from moe_runtime.runtime.relaunch import layout_changes

        if self.cluster is not None and not layout_changes(self.cluster.cfg.cluster, cfg.cluster):
            self.cluster = self.cluster.restart(cfg)
            self.restarts += 1
            return self.cluster
        self.close()
        self.cluster = Cluster.start(cfg)
        self.cluster.prepare_training()  # as re-initialised processes have: the first run's first step is not slower
        self.starts += 1
        return self.cluster

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None


__all__ = ["ClusterReuse"]
