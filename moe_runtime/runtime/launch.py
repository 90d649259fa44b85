"""Launch and release the parties of a cluster: Ray, the expert actors' placement group, the expert actors and the
router workers, loaded with the oracle's initial weights (the dense part to the workers, expert slices to the
actors that host them)."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from moe_runtime.config import RuntimeConfig
from moe_runtime.model.transformer import build_model, expert_param_name
from moe_runtime.placement import Placement
from moe_runtime.records import ActorInfo
from moe_runtime.runtime.calls import FREE_WAIT_S, START_TIMEOUT_S, get_within
from moe_runtime.runtime.expert_actor import ExpertActor
from moe_runtime.runtime.hf_loading import load_cluster, open_checkpoint
from moe_runtime.runtime.nodes import worker_options
from moe_runtime.runtime.ray_env import ClusterStartError, RayEnv, check_layout, start_ray
from moe_runtime.runtime.router_worker import RouterWorker, dense_state_from_full

log = logging.getLogger(__name__)


def check_config(cfg: RuntimeConfig) -> None:
    """Every static check of a cluster config; raises ClusterStartError before anything starts."""
    c, t = cfg.cluster, cfg.train
    chunks = c.router_workers * t.micro_batches
    problems = []
    if t.batch_size % chunks:
        problems.append(
            f"train.batch_size = {t.batch_size}: must be a multiple of cluster.router_workers x train.micro_batches "
            f"= {c.router_workers} x {t.micro_batches} = {chunks} (every chunk the same size)"
        )
    if c.grad_sync == "gloo" and c.ray_address is None and c.num_nodes == 1 and c.router_workers > 64:
        problems.append(f"cluster.router_workers = {c.router_workers}: more than 64 gloo ranks on one machine")
    import torch  # a local Ray's parties see this machine's devices

    cpu_parties = "every party" if not torch.cuda.is_available() else "the router workers" if (
        c.gpus_per_router_worker == 0) else None  # fmt: skip
    if t.precision == "bf16" and c.ray_address is None and cpu_parties:
        problems.append(f"train.precision = 'bf16': expected 'fp32' here, {cpu_parties} would compute on the CPU "
                        "(bf16 is for GPUs; transport.wire_dtype: bfloat16 is the CPU's bf16)")
    if problems:
        raise ClusterStartError("invalid cluster config:\n" + "\n".join(problems))
    check_layout(c)


@dataclass
class Launched:
    """What `launch` started: the handles a Cluster drives and what `release` must give back."""

    env: RayEnv
    placement_group: Any  # None when the actors ask for no resources
    experts: list[Any]  # ExpertActor handles, index = actor index
    workers: list[Any]  # RouterWorker handles
    infos: list[ActorInfo]
    placement: Placement
    token: str
    hf_load: Any = None  # hf_loading.LoadReport when the weights came from model.checkpoint
    origin_token: str | None = None  # the token the processes were created with, when relaunch.py re-initialised them


def _expert_bundle(cfg: RuntimeConfig) -> dict[str, float]:
    c = cfg.cluster
    return {k: v for k, v in (("GPU", c.gpus_per_expert_actor), ("CPU", c.cpus_per_actor)) if v > 0}


def _placement_group(cfg: RuntimeConfig) -> Any:
    """A ready placement group of one bundle per expert actor, or None when they ask for nothing."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    c, bundle = cfg.cluster, _expert_bundle(cfg)
    if not bundle:
        return None
    free = ray.available_resources()
    short = {k: v * c.expert_actors for k, v in bundle.items() if v * c.expert_actors > free.get(k, 0.0) + 1e-9}
    if short:  # fail now rather than wait for a placement group that cannot be satisfied
        raise ClusterStartError(
            f"cluster.expert_actors = {c.expert_actors} need {short} but only "
            f"{ {k: free.get(k, 0.0) for k in short} } are free in the Ray cluster "
            f"(total {ray.cluster_resources()}); another cluster may hold the rest"
        )
    pg = placement_group([dict(bundle) for _ in range(c.expert_actors)], strategy=c.placement_strategy)
    try:
        ray.get(pg.ready(), timeout=START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ClusterStartError(
            f"placement group of {c.expert_actors} x {bundle} ({c.placement_strategy}) not ready after "
            f"{START_TIMEOUT_S:.0f} s: the Ray cluster has {ray.cluster_resources()}"
        ) from None
    return pg


def _start_actors(cfg: RuntimeConfig, pg: Any, token: str) -> tuple[list[Any], list[Any]]:
    import ray

    c = cfg.cluster
    conf = cfg.model_dump(mode="json")
    actor_cls = ray.remote(ExpertActor)
    experts = []
    for i in range(c.expert_actors):
        opts: dict[str, Any] = {"num_gpus": c.gpus_per_expert_actor, "num_cpus": c.cpus_per_actor,
                                "max_restarts": c.max_restarts, "max_task_retries": 0}
        if pg is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=i)
        experts.append(actor_cls.options(**opts).remote(conf, i, token))
    return experts, start_workers(cfg, token, range(c.router_workers))


def start_workers(cfg: RuntimeConfig, token: str, indices: range) -> list[Any]:
    """RouterWorker handles of these indices (not waited for)."""
    import ray

    c, conf = cfg.cluster, cfg.model_dump(mode="json")
    worker_cls = ray.remote(RouterWorker)
    where = worker_options(c.router_workers, c.cpus_per_actor)
    return [
        worker_cls.options(num_gpus=c.gpus_per_router_worker, max_restarts=c.max_restarts, max_task_retries=0,
                           **where[w]).remote(conf, w, token)  # spread over nodes: a lost node leaves a worker
        for w in indices
    ]  # fmt: skip


def _load_initial_weights(cfg: RuntimeConfig, experts: list[Any], workers: list[Any], placement: Placement,
                          infos: list[ActorInfo]) -> None:  # fmt: skip
    """The oracle's initial weights: the dense part to every worker, each expert slice to the actors hosting it."""
    import ray

    full = build_model(cfg.model, seed=cfg.train.seed)
    dense_ref = ray.put(dense_state_from_full(full, cfg))
    sd = full.state_dict()
    shards = {
        (layer, e): {"w1": sd[expert_param_name(layer, "w1")][e].clone(),
                     "w2": sd[expert_param_name(layer, "w2")][e].clone()}
        for layer in range(cfg.model.num_layers) for e in range(cfg.model.num_experts)
    }  # fmt: skip
    del full, sd
    refs = [a.load_shards.remote({k: shards[k] for k in placement.shards_of(i)}, placement.version)
            for i, a in enumerate(experts)]
    addresses = [i.address for i in infos]
    # dense weights by a call, not a constructor argument: a restarted worker must not depend on them
    refs += [w.set_placement.remote(placement.to_dict(), addresses) for w in workers]
    refs += [w.load_model_state.remote(dense_ref) for w in workers]
    get_within(refs, START_TIMEOUT_S, "loading weights")


def launch(cfg: RuntimeConfig) -> Launched:
    """Start (or join) Ray, place and start every actor, load the oracle's initial weights. On any failure what was
    started is killed and Ray is left as found."""

    check_config(cfg)
    hf_ckpt = open_checkpoint(cfg.model)  # a bad checkpoint fails here, naming the file and tensor, before Ray
    t_start = time.perf_counter()
    env = start_ray(cfg.cluster)
    log.info("ray up in %.1f s (%s)", time.perf_counter() - t_start, env.mode)
    pg = None
    experts: list[Any] = []
    workers: list[Any] = []
    try:
        token = cfg.transport.auth_token or secrets.token_hex(16)
        pg = _placement_group(cfg)
        experts, workers = _start_actors(cfg, pg, token)
        return wire(cfg, Launched(env, pg, experts, workers, [], Placement.contiguous(1, 1, 1), token), hf_ckpt,
                    t_start)
    except BaseException:
        release(Launched(env, pg, experts, workers, [], Placement.contiguous(1, 1, 1), ""), wait_free=False)
        raise


def wire(cfg: RuntimeConfig, started: Launched, hf_ckpt: Any, t_start: float) -> Launched:
    """Started (or re-initialised: relaunch.py) parties -> a Launched cluster: the actors' infos, the contiguous
    placement, the initial weights (the oracle's, or streamed from `hf_ckpt`)."""
    experts, workers = started.experts, started.workers
    infos = get_within([a.info.remote() for a in experts], START_TIMEOUT_S, "expert actors starting")
    log.info("%d expert actors up at %.1f s", len(experts), time.perf_counter() - t_start)
    nodes = sorted({i.node_id for i in infos})
    placement = Placement.contiguous(cfg.model.num_layers, cfg.model.num_experts, cfg.cluster.expert_actors,
                                     tuple(nodes.index(i.node_id) for i in infos))
    hf_load = None
    if hf_ckpt is None:
        _load_initial_weights(cfg, experts, workers, placement, infos)
    else:  # streamed: each party reads its own tensors from the shard files
        addresses = [i.address for i in infos]
        get_within([w.set_placement.remote(placement.to_dict(), addresses) for w in workers], START_TIMEOUT_S,
                   "wiring router workers")
        hf_load = load_cluster(hf_ckpt, experts, workers, placement, START_TIMEOUT_S)
        log.info("checkpoint loaded:\n%s", hf_load.describe())
    log.info("%d router workers up at %.1f s", len(workers), time.perf_counter() - t_start)
    return Launched(started.env, started.placement_group, experts, workers, infos, placement, started.token, hf_load,
                    started.origin_token)


def release(launched: Launched, wait_free: bool = True) -> None:
    """Kill every party, give the placement group back (waiting until Ray has freed its bundles, so a next start
    sees the GPUs) and leave Ray as it was found."""
    import ray

    for h in launched.workers + launched.experts:
        try:
            ray.kill(h, no_restart=True)
        except ValueError as err:  # not an actor handle any more
            log.debug("kill: %s", err)
    pg = launched.placement_group
    if pg is not None:
        from ray.util.placement_group import placement_group_table, remove_placement_group

        remove_placement_group(pg)
        tag = pg.id.hex()
        deadline = time.monotonic() + (FREE_WAIT_S if wait_free else 0.0)
        while time.monotonic() < deadline and (
            placement_group_table(pg).get("state") != "REMOVED" or any(tag in k for k in ray.cluster_resources())
        ):
            time.sleep(0.05)
    launched.env.shutdown()
