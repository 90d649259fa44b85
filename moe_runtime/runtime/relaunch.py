"""Relaunch: a fresh cluster for a new config on the processes of a running one (same expert actors and resources,
LAYOUT_FIELDS; the number of router workers may change: extra ones are started, surplus ones killed), instead of killing
every party and starting new ones. Starting a party (a Ray worker process ~0.4 CPU-s, `import torch` ~1.0, the
gRPC server) costs ~1.6 CPU-s on this machine (docs/measurements.md); re-initialising one costs ~0.1 CPU-s. Used
where a run trains or serves several configurations of one layout one after the other (seeds, router variants,
presets: benchmarks/router_experiment.py, benchmarks/step.py).

Each party re-runs its constructor for the new config in its own process (ExpertActor.reset, RouterWorker.reset):
new shards, optimizer, gRPC server (new port), dense model, data loader, gloo group; nothing carries over but the
process and its imports. The driver then wires them as `launch` does (launch.wire): contiguous placement, the
oracle's initial weights of the new config, a new auth token.

A party Ray restarts after a relaunch gets its *first* constructor arguments from Ray; so the relaunched
config and token are kept in Ray's internal KV under the token the processes were created with, and every
party's constructor takes them from there when they exist (runtime/party_args.py): a restarted party comes back with
the config it was last given, never an earlier one.
"""

from __future__ import annotations

import pickle
import secrets
import time

from moe_runtime.config import ClusterConfig, RuntimeConfig
from moe_runtime.runtime.calls import START_TIMEOUT_S, get_within
from moe_runtime.runtime.hf_loading import open_checkpoint
from moe_runtime.runtime.launch import Launched, check_config, release, start_workers, wire
from moe_runtime.runtime.party_args import kv_key
from moe_runtime.runtime.ray_env import ClusterStartError

# cluster fields that fix the processes, their resources and Ray's restart policy: a relaunch must keep them
# (router_workers may change: workers hold no placement-group bundle; extra ones are started, surplus ones killed)
LAYOUT_FIELDS = ("expert_actors", "num_gpus", "num_nodes", "gpus_per_expert_actor", "gpus_per_router_worker",
                 "cpus_per_actor", "placement_strategy", "max_restarts", "ray_address")


def layout_changes(old: ClusterConfig, new: ClusterConfig, *, ray_owned: bool = True) -> list[str]:
    """'field: old -> new' for every layout field that differs (empty: the processes can be reused). `ray_owned`
    False: the processes run on a Ray the cluster did not start (RayEnv.owned), whose GPUs cluster.num_gpus did
    not set, so it is not compared."""
    fields = LAYOUT_FIELDS if ray_owned else tuple(f for f in LAYOUT_FIELDS if f != "num_gpus")
    return [f"cluster.{f}: {getattr(old, f)!r} -> {getattr(new, f)!r}" for f in fields
            if getattr(old, f) != getattr(new, f)]


def forget(launched: Launched) -> None:
    """Drop the relaunch record of these processes (they are being released)."""
    if launched.origin_token is None:
        return
    from ray.experimental import internal_kv

    if internal_kv._internal_kv_initialized():
        internal_kv._internal_kv_del(kv_key(launched.origin_token))


def check_layout(launched: Launched, old: RuntimeConfig, cfg: RuntimeConfig) -> None:
    """ClusterStartError unless `cfg` is a valid config with the layout `launched` (started for `old`) runs."""
    check_config(cfg)
    problems = layout_changes(old.cluster, cfg.cluster, ray_owned=launched.env.owned)
    if len(launched.experts) != cfg.cluster.expert_actors:  # scaled since its start (scale.py)
        problems.append(f"the cluster runs {len(launched.experts)} expert actors (scaled), the config asks for "
                        f"cluster.expert_actors = {cfg.cluster.expert_actors}")
    if problems:
        raise ClusterStartError("relaunch needs the same layout (start a new cluster instead):\n"
                                + "\n".join(problems))


def relaunch(launched: Launched, old: RuntimeConfig, cfg: RuntimeConfig) -> Launched:
    """Re-initialise every party of `launched` (started for `old`) for `cfg` and wire them: what `launch(cfg)`
    returns, on the same processes. Raises ClusterStartError when the layouts differ (nothing is touched then);
    on any later failure every party is killed (as a failed `launch` leaves nothing behind)."""
    import ray
    from ray.experimental import internal_kv

    check_layout(launched, old, cfg)
    hf_ckpt = open_checkpoint(cfg.model)  # a bad checkpoint fails here, before any party is touched
    t_start = time.perf_counter()
    origin = launched.origin_token or launched.token
    token = cfg.transport.auth_token or secrets.token_hex(16)
    conf = cfg.model_dump(mode="json")
    n = cfg.cluster.router_workers
    kept, surplus = launched.workers[:n], launched.workers[n:]
    started = Launched(launched.env, launched.placement_group, launched.experts, list(kept), [],
                       launched.placement, token, None, origin)
    try:
        internal_kv._internal_kv_put(kv_key(origin), pickle.dumps((conf, token)), overwrite=True)
        for h in surplus:
            ray.kill(h, no_restart=True)
        resets = [a.reset.remote(conf, i, token) for i, a in enumerate(launched.experts)]
        resets += [w.reset.remote(conf, i, token) for i, w in enumerate(kept)]
        # extra workers get the origin token as their argument: they read (conf, token) from the KV like a restarted
        # party, so a later relaunch reaches them too
        started.workers += start_workers(cfg, origin, range(len(kept), n))
        get_within(resets + [w.ping.remote() for w in started.workers], START_TIMEOUT_S, "re-initialising parties")
        return wire(cfg, started, hf_ckpt, t_start)
    except BaseException:
        forget(started)
        release(started, wait_free=False)
        raise


__all__ = ["LAYOUT_FIELDS", "check_layout", "forget", "layout_changes", "relaunch"]
