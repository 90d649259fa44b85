"""Starting or joining Ray, the same way for the CLI, the Cluster and the tests.

Modes (chosen from ClusterConfig):
- ``ray_address=None, num_nodes=1``: a local single-node Ray that advertises ``num_gpus`` (fake GPUs on a CPU
  machine) and binds 127.0.0.1 only (GCS, raylet, workers). Binding loopback needs
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in the environment of every Ray process *and* of this process's Ray
  constants (it is read when ``ray`` is imported); ``_loopback_only()`` sets both before starting anything.
- ``ray_address=None, num_nodes>1``: a simulated multi-node cluster on this machine (``ray.cluster_utils.Cluster``),
  ``num_gpus`` split over the nodes, every node on 127.0.0.1. Each node is a separate raylet with its own node id,
  so placement-group strategies (SPREAD, STRICT_SPREAD) behave as on real machines.
- ``ray_address="auto"`` or ``"ray://..."`` or ``"host:port"``: join an existing cluster (ray up, KubeRay,
  `ray start --head`) with token auth, the address kept as given and a deadline: see ray_join.py.
If this process already has Ray initialised (a test session, a notebook), that Ray is used and not shut down by us.

Device rule used everywhere (driver, router workers, expert actors): ``pick_device()`` = "cuda" when
torch sees a CUDA device, else "cpu".
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from moe_runtime.config import ClusterConfig
from moe_runtime.model.device import ComputeDevice  # the one device rule

LOOPBACK = "127.0.0.1"
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class ClusterStartError(RuntimeError):
    """The cluster cannot start as configured (raised before any actor is created)."""


def pick_device() -> str:
    return str(ComputeDevice.resolve("auto").device)


def _loopback_only() -> None:
    """Make this process and every Ray process it spawns use 127.0.0.1 only (local mode only)."""
    os.environ[_CLUSTER_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # ray was imported before we could set the variable: apply it to the live module
        constants.ENABLE_RAY_CLUSTER = False


@dataclass
class RayEnv:
    """A started or joined Ray. `owned`: we started it and `shutdown()` stops it."""

    mode: str  # "local" | "multinode" | "address" | "attached"
    owned: bool
    address: str | None = None
    dashboard_url: str | None = None  # the Ray dashboard (http://host:port) when it runs
    _sim: Any = field(default=None, repr=False)  # ray.cluster_utils.Cluster in multinode mode

    def node_ids(self) -> list[str]:
        import ray

        return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))

    def resources(self) -> dict[str, float]:
        import ray

        return dict(ray.cluster_resources())

    def shutdown(self) -> None:
        if not self.owned:
            return
        import ray

        ray.shutdown()
        if self._sim is not None:
            self._sim.shutdown()
            self._sim = None
        self.owned = False


def _check_resources(cfg: ClusterConfig, resources: dict[str, float], nodes: int) -> None:
    gpus = float(resources.get("GPU", 0.0))
    cpus = float(resources.get("CPU", 0.0))
    need_gpu = cfg.expert_actors * cfg.gpus_per_expert_actor
    need_cpu = (cfg.expert_actors + cfg.router_workers) * cfg.cpus_per_actor
    problems = []
    if need_gpu > gpus + 1e-9:
        problems.append(
            f"cluster.expert_actors = {cfg.expert_actors} x gpus_per_expert_actor = {cfg.gpus_per_expert_actor:g} "
            f"needs {need_gpu:g} GPUs; the Ray cluster has {gpus:g}"
        )
    if need_cpu > cpus + 1e-9:
        problems.append(
            f"cluster.cpus_per_actor = {cfg.cpus_per_actor:g} x {cfg.expert_actors + cfg.router_workers} actors needs "
            f"{need_cpu:g} CPUs; the Ray cluster has {cpus:g} (use cpus_per_actor: 0 on small machines)"
        )
    if cfg.placement_strategy == "STRICT_SPREAD" and cfg.expert_actors > nodes:
        problems.append(
            f"cluster.placement_strategy = STRICT_SPREAD puts every expert actor on its own node: "
            f"{cfg.expert_actors} actors but the Ray cluster has {nodes} node(s)"
        )
    if problems:
        raise ClusterStartError("cannot place the cluster:\n" + "\n".join(problems))


def check_layout(cfg: ClusterConfig) -> None:
    """Static checks of a local layout (no Ray needed): raises ClusterStartError with every problem found."""
    if cfg.ray_address is not None:
        if cfg.num_nodes > 1:
            raise ClusterStartError(
                f"cluster.num_nodes = {cfg.num_nodes}: simulated nodes exist only in local mode (ray_address unset); "
                f"a real cluster has the nodes it has"
            )
        return
    if cfg.num_nodes > 1 and cfg.num_gpus % cfg.num_nodes:
        raise ClusterStartError(
            f"cluster.num_gpus = {cfg.num_gpus}: must split evenly over num_nodes = {cfg.num_nodes} simulated nodes"
        )
    per_node = cfg.num_gpus // cfg.num_nodes
    if cfg.num_nodes > 1 and cfg.gpus_per_expert_actor > 0:
        fit = int(per_node // cfg.gpus_per_expert_actor + 1e-9) * cfg.num_nodes
        if cfg.expert_actors > fit:
            raise ClusterStartError(
                f"cluster.expert_actors = {cfg.expert_actors}: only {fit} fit on {cfg.num_nodes} nodes with "
                f"{per_node} GPUs each at gpus_per_expert_actor = {cfg.gpus_per_expert_actor:g}"
            )
    cpus = os.cpu_count() or 1
    _check_resources(cfg, {"GPU": cfg.num_gpus, "CPU": cpus if cfg.num_nodes == 1 else cfg.num_nodes * max(
        1, cpus // cfg.num_nodes)}, cfg.num_nodes)


def start_ray(cfg: ClusterConfig, *, object_store_mb: int = 512, log_to_driver: bool = True,
              system_config: dict[str, Any] | None = None) -> RayEnv:
    """Start or join Ray as `cfg` says, then check that the layout fits. Nothing is created on failure
    (a Ray we started is shut down again). `system_config`: Ray's own settings for a Ray started here (local or
    simulated nodes), e.g. {"health_check_period_ms": 500, "health_check_failure_threshold": 3} to find a lost
    node in ~1.5 s instead of Ray's ~15 s (faults benchmark and node-loss tests)."""
    check_layout(cfg)
    if cfg.ray_address is None:
        _loopback_only()
    import ray

    if ray.is_initialized():
        env = RayEnv("attached", owned=False)
        alive = len([n for n in ray.nodes() if n.get("Alive")])
        if cfg.num_nodes > alive:
            raise ClusterStartError(
                f"cluster.num_nodes = {cfg.num_nodes} but the running Ray has {alive} node(s): simulated nodes are "
                f"started only when this process has no Ray yet"
            )
    elif cfg.ray_address is not None:
        from moe_runtime.runtime.ray_join import JoinError, join

        try:
            joined = join(cfg.ray_address, cfg.connect_timeout_s, log_to_driver=log_to_driver)
        except JoinError as e:
            raise ClusterStartError(str(e)) from None
        env = RayEnv("address", owned=True, address=cfg.ray_address, dashboard_url=joined.dashboard_url)
    elif cfg.num_nodes == 1:
        ray.init(
            address="local",  # always a fresh local Ray: never join a stray one found on the machine
            num_gpus=cfg.num_gpus,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            object_store_memory=object_store_mb << 20,
            log_to_driver=log_to_driver,
            logging_level=logging.WARNING,
            **({"_system_config": system_config} if system_config else {}),
        )
        env = RayEnv("local", owned=True)
    else:
        env = _start_multinode(cfg, object_store_mb, log_to_driver, system_config)
    try:
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
        _check_resources(cfg, ray.cluster_resources(), nodes)
    except BaseException:
        env.shutdown()
        raise
    return env


def _start_multinode(cfg: ClusterConfig, object_store_mb: int, log_to_driver: bool,
                     system_config: dict[str, Any] | None = None) -> RayEnv:
    import ray
    from ray.cluster_utils import Cluster as SimCluster

    gpus = cfg.num_gpus // cfg.num_nodes
    cpus = max(1, (os.cpu_count() or 1) // cfg.num_nodes)
    node_args = {
        "num_cpus": cpus,
        "num_gpus": gpus,
        "node_ip_address": LOOPBACK,
        "object_store_memory": max(75, object_store_mb // cfg.num_nodes) << 20,
    }
    head = {**node_args, "include_dashboard": False, **({"_system_config": system_config} if system_config else {})}
    sim = SimCluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(cfg.num_nodes - 1):
            sim.add_node(**node_args)
        sim.wait_for_nodes()
        ray.init(address=sim.address, log_to_driver=log_to_driver, logging_level=logging.WARNING,
                 _node_ip_address=LOOPBACK)
    except BaseException:
        sim.shutdown()
        raise
    return RayEnv("multinode", owned=True, address=sim.address, _sim=sim)
