"""Calibrating a simulator host table against the real local cluster (``simulate --calibrate --against-cluster``,
``benchmarks/sim_accuracy.py``).

It lives in runtime/ (the layer that starts clusters and may import the simulator), not in sim/ (which never
starts one): the CLI passes ``against_cluster(config)`` into ``sim.cli_impl.simulate_command``; the benchmark
uses the helpers directly.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import ray

from moe_runtime.config import RuntimeConfig
from moe_runtime.runtime.cluster import Cluster
from moe_runtime.runtime.ray_env import ClusterStartError
from moe_runtime.sim.cli_impl import ClusterCalibration
from moe_runtime.sim.hardware import HardwareTable
from moe_runtime.sim.simulator import Simulator

__all__ = ["CONTROL_ROUNDS", "against_cluster", "measure_cluster_cpu_scale", "processes_cpu_s", "ray_round_trip"]

CONTROL_ROUNDS = 3  # Ray round trips of the driver per step: forward_backward, sync + norms, apply


def processes_cpu_s(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of `procs` so far; a process that ended meanwhile counts 0."""
    total = 0.0
    for p in procs:
        try:
            total += sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def ray_round_trip(cluster: Cluster, n: int = 20) -> float:
    """Median seconds of a Ray actor call that does nothing (a router worker's ping)."""
    h = cluster.workers[0]
    ray.get(h.ping.remote())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        ray.get(h.ping.remote())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_cluster_cpu_scale(cfg: RuntimeConfig, table: HardwareTable, warmup: int = 2, steps: int = 3,
                              log: Callable[[str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Calibrate a host table against the real local cluster: start the config's cluster (``Cluster.start``),
    train `warmup` steps (dropped: optimizer state and allocators grow), then `steps` steps, each recording its
    routing per worker and micro-batch and the CPU seconds of every process of the run (this one and its
    descendants: Ray, router workers, expert actors). ``cpu_scale`` = those CPU seconds / the CPU work the
    table gives the same routing (the cluster's processes share caches and carry Python, gRPC and Ray costs
    that single-process measurements miss); ``step_overhead_s`` = the driver's Ray round trips per step. Put
    both in the table (``simulate --calibrate --against-cluster`` does)."""
    say = log or (lambda _msg: None)
    sim = Simulator.from_config(cfg, dataclasses.replace(table, cpu_scale=1.0))
    cluster_cpu, sim_cpu = [], []
    with Cluster.start(cfg) as cluster:
        rtt = ray_round_trip(cluster)
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        for i in range(warmup + steps):
            c0 = processes_cpu_s(procs)
            rep = cluster.train_step()
            used = processes_cpu_s(procs) - c0
            if i < warmup:
                continue
            counts = np.stack([np.asarray(x, dtype=np.int64) for x in rep.worker_loads])
            cluster_cpu.append(used)
            sim_cpu.append(sim.run_step(counts).phases["cpu_work_s"])
            say(f"step {i}: cluster {used:.2f} CPU s, table {sim_cpu[-1]:.2f} CPU s")
    return {"cpu_scale": sum(cluster_cpu) / sum(sim_cpu), "step_overhead_s": CONTROL_ROUNDS * rtt,
            "ray_round_trip_s": rtt, "cluster_cpu_s": cluster_cpu, "table_cpu_s": sim_cpu, "warmup": warmup}  # fmt: skip


def against_cluster(config_path: str | Path) -> ClusterCalibration:
    """``simulate --calibrate --against-cluster``: `measure_cluster_cpu_scale` on the config's cluster, a cluster
    that cannot start here reported as the usage error it is (a ValueError naming the config)."""

    def measure(cfg: RuntimeConfig, table: HardwareTable, log: Callable[[str], None]) -> dict[str, Any]:
        try:
            return measure_cluster_cpu_scale(cfg, table, log=log)
        except ClusterStartError as e:
            raise ValueError(f"--against-cluster: the cluster of {config_path} cannot start here: {e}") from None

    return measure
