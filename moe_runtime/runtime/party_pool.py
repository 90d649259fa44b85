"""Keeping a shut-down cluster's processes for the next cluster of the same layout, inside `keep_parties()`.

A driver that starts and stops many clusters one after the other (a benchmark suite, a notebook sweeping seeds or
presets) pays a party start each time: a Ray worker process, `import torch`, the gRPC server, ~1.6 CPU-s a party
here (docs/measurements.md). Inside `keep_parties()`, `Cluster.shutdown` parks the cluster's parties instead of
killing them (when every one answers a ping), and the next `Cluster.start` re-initialises them for its config with
`relaunch.relaunch` (what `Cluster.restart` does: a fresh cluster's state, the oracle's initial weights) when the
layout is the same (relaunch.LAYOUT_FIELDS: expert actors and their resources; router workers may differ; num_gpus
too, on a Ray the cluster did not start); a different layout releases the parked ones first, then starts anew.
A parked party that died meanwhile is waited for (Ray restarts it) before the re-use; one that cannot come back, or
fails to re-initialise, makes it a new start instead. At most one cluster is
parked; leaving the context releases it. Outside the context nothing changes. Parked parties keep their resources
(fake or real GPUs) until then: code that needs them free calls `release_parked()` (scaling up does).

    with party_pool.keep_parties() as pool:
        for cfg in configs:
            with Cluster.start(cfg) as c:   # the second and later ones re-use the processes
                ...
        print(pool.starts, pool.reuses)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from moe_runtime.config import RuntimeConfig
from moe_runtime.runtime.calls import get_within
from moe_runtime.runtime.launch import Launched, check_config, release
from moe_runtime.runtime.ray_env import ClusterStartError

log = logging.getLogger(__name__)

PARK_PING_S = 10.0  # a party kept must answer a ping within this (or hang_timeout_s when shorter)


@dataclass
class PartyPool:
    """The parked cluster (its parties and the config they run) and what the pool did."""

    parked: tuple[Launched, RuntimeConfig] | None = field(default=None, repr=False)
    starts: int = 0  # clusters started on new processes
    reuses: int = 0  # clusters started on parked processes
    layouts: list[str] = field(default_factory=list)  # "<layout> new|re-used" per start, in order


_active: PartyPool | None = None


@contextmanager
def keep_parties() -> Iterator[PartyPool]:
    """Within it, clusters shut down are parked and the next start of their layout re-uses them."""
    global _active
    if _active is not None:
        raise RuntimeError("keep_parties() is already active in this process")
    pool = _active = PartyPool()
    try:
        yield pool
    finally:
        _active = None
        _drop(pool)


def release_parked() -> None:
    """Kill the parked parties now (no-op when none): for code about to need their resources (scaling up)."""
    if _active is not None:
        _drop(_active)


def _drop(pool: PartyPool) -> None:
    if pool.parked is not None:
        launched, _ = pool.parked
        pool.parked = None
        _release(launched)


def _release(launched: Launched) -> None:
    from moe_runtime.runtime import relaunch

    relaunch.forget(launched)
    release(launched)


def park(launched: Launched, cfg: RuntimeConfig) -> bool:
    """Keep `launched` (a cluster being shut down, running `cfg`) for the next start; False (the caller releases
    it) when no pool is active or a party does not answer a ping (dead, hung, restarting: not worth re-using)."""
    pool = _active
    if pool is None:
        return False
    try:
        pings = [h.ping.remote() for h in launched.workers + launched.experts]
        get_within(pings, min(cfg.cluster.hang_timeout_s, PARK_PING_S), "parking parties")
    except Exception as err:  # noqa: BLE001 - any failure means: do not keep these
        log.info("not keeping the parties of a shut-down cluster: %s", err)
        return False
    _drop(pool)
    pool.parked = (launched, cfg)
    return True


def take(cfg: RuntimeConfig) -> Launched | None:
    """The parked parties re-initialised and wired for `cfg` when the layout is the same, else None (any parked
    parties released, so the caller's new start finds their resources free)."""
    from moe_runtime.runtime import recovery, relaunch

    pool = _active
    if pool is None:
        return None
    pool.layouts.append(f"{_layout(cfg)} new")  # corrected below when the parked ones are re-used
    if pool.parked is None:
        pool.starts += 1
        return None
    launched, old = pool.parked
    pool.parked = None
    if (relaunch.layout_changes(old.cluster, cfg.cluster, ray_owned=launched.env.owned)
            or len(launched.experts) != cfg.cluster.expert_actors):
        _release(launched)
        pool.starts += 1
        return None
    try:
        check_config(cfg)
    except ClusterStartError:  # an invalid config: the caller's start raises the same error, nothing left behind
        _release(launched)
        raise
    try:
        # a party that died while parked is being restarted by Ray: wait for it (the others answer at once)
        recovery.wait_alive(launched.experts, launched.workers, hang_timeout_s=min(old.cluster.hang_timeout_s,
                                                                                   PARK_PING_S))  # fmt: skip
    except Exception as err:  # noqa: BLE001 - dead for good, hung: start anew
        log.warning("the parked parties are not all alive (%s): starting new ones", err)
        _release(launched)
        pool.starts += 1
        return None
    try:
        fresh = relaunch.relaunch(launched, old, cfg)  # releases every party itself when it fails
    except Exception as err:  # noqa: BLE001 - a party failed to re-initialise: start anew instead
        log.warning("re-using the parked parties failed (%s): starting new ones", err)
        pool.starts += 1
        return None
    pool.reuses += 1
    pool.layouts[-1] = f"{_layout(cfg)} re-used"
    return fresh


def _layout(cfg: RuntimeConfig) -> str:
    c = cfg.cluster
    return f"{c.expert_actors} actors / {c.router_workers} workers / {c.num_gpus} GPUs"


__all__ = ["PartyPool", "keep_parties", "park", "release_parked", "take"]
