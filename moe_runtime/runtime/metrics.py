"""Cluster metrics through Ray's metrics API (`ray.util.metrics`): they appear on the Ray dashboard and on each
node's Prometheus endpoint (`http://<node>:<metrics_export_port>/metrics`, names prefixed `ray_`). Recorded by
the driver once per training step; `snapshot()` is the same numbers for `status --json` ("metrics").

- moe_expert_tokens{layer, expert}: token copies routed to each expert in the last step
- moe_actor_tokens{actor}: token copies each expert actor served in the last step (the data plane's replica split)
- moe_imbalance: max / mean tokens per actor in the last step
- moe_step_seconds{phase}: the last step's wall ("step") and its phases (records.StepTimings)
- moe_exchange_seconds{quantile="p50"|"p99"}: one MoE layer's expert exchange (dispatch + expert compute, forward
  or backward), estimated per step as that step's exchange wall / (layers x micro-batches x 2); quantiles over the
  last WINDOW steps. Not a per-RPC latency: the router workers time exchanges per layer, not per call.
- moe_rebalances_total, moe_recoveries_total: events since the driver started (counters)
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from typing import Any

from moe_runtime.runtime.step_log import PHASES

WINDOW = 100
log = logging.getLogger(__name__)


def quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile (q in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


class _Instruments:
    """The Ray metric objects: one set per process (Ray keys metrics by name), shared by every Cluster in it."""

    _one: _Instruments | None = None

    @classmethod
    def get(cls) -> _Instruments:
        if cls._one is None:
            cls._one = cls()
        return cls._one

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge

        self._expert = Gauge("moe_expert_tokens", "token copies routed to the expert in the last step",
                             tag_keys=("layer", "expert"))
        self._actor = Gauge("moe_actor_tokens", "token copies the expert actor served in the last step",
                            tag_keys=("actor",))
        self._imbalance = Gauge("moe_imbalance", "max / mean token copies per expert actor, last step")
        self._step = Gauge("moe_step_seconds", "last training step's wall and its phases (s)", tag_keys=("phase",))
        self._exchange = Gauge("moe_exchange_seconds", "one MoE layer's expert exchange (s), over recent steps",
                               tag_keys=("quantile",))
        self._rebalances = Counter("moe_rebalances_total", "expert placement changes (scheduler rebalances)")
        self._recoveries = Counter("moe_recoveries_total", "recoveries from a failed party")


class ClusterMetrics:
    def __init__(self) -> None:
        ins = _Instruments.get()
        self._expert, self._actor, self._imbalance, self._step = ins._expert, ins._actor, ins._imbalance, ins._step
        self._exchange, self._rebalances, self._recoveries = ins._exchange, ins._rebalances, ins._recoveries
        self._exchange_s: deque[float] = deque(maxlen=WINDOW)
        self._seen_rebalances = 0
        self._seen_recoveries = 0
        self.last: dict[str, Any] = {}

    def record_step(self, cluster: Any, rep: Any, record: dict[str, Any]) -> None:
        m, t = cluster.cfg.model, rep.timings
        load = rep.expert_load.tolist()
        for layer, row in enumerate(load):
            for e, n in enumerate(row):
                self._expert.set(float(n), tags={"layer": str(layer), "expert": str(e)})
        for a, n in enumerate(record["actor_tokens"]):
            self._actor.set(float(n), tags={"actor": str(a)})
        if record["imbalance"] is not None:
            self._imbalance.set(record["imbalance"])
        phases = {"step": t.step_s, **{k.removesuffix("_s"): getattr(t, k) for k in PHASES}}
        for phase, v in phases.items():
            self._step.set(float(v), tags={"phase": phase})
        calls = max(1, m.num_layers * cluster.cfg.train.micro_batches * 2)
        self._exchange_s.append((t.dispatch_s + t.expert_s) / calls)
        window = list(self._exchange_s)
        exchange = {"p50": quantile(window, 0.5), "p99": quantile(window, 0.99)}
        for q, v in exchange.items():
            self._exchange.set(float(v), tags={"quantile": q})
        new_reb = record["rebalances"] - self._seen_rebalances
        if new_reb > 0:
            self._rebalances.inc(new_reb)
            self._seen_rebalances = record["rebalances"]
        new_rec = cluster.recoveries - self._seen_recoveries
        if new_rec > 0:
            self._recoveries.inc(new_rec)
            self._seen_recoveries = cluster.recoveries
        self.last = {"step": rep.step, "expert_tokens": load, "actor_tokens": list(record["actor_tokens"]),
                     "imbalance": record["imbalance"], "step_seconds": phases, "exchange_seconds": exchange,
                     "rebalances_total": self._seen_rebalances, "recoveries_total": self._seen_recoveries}

    def snapshot(self) -> dict[str, Any]:
        return dict(self.last)


_by_cluster: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def metrics_for(cluster: Any) -> ClusterMetrics:
    """The cluster's metrics (created on first use: Ray must be up)."""
    if cluster not in _by_cluster:
        _by_cluster[cluster] = ClusterMetrics()
    return _by_cluster[cluster]


def record_metrics(cluster: Any, rep: Any, record: dict[str, Any]) -> None:
    """Export one step; a metrics failure is logged once and never fails training."""
    try:
        metrics_for(cluster).record_step(cluster, rep, record)
    except Exception as e:  # noqa: BLE001 - observability must not stop a run
        if not getattr(cluster, "_metrics_warned", False):
            log.warning("ray metrics export failed (%s: %s); training goes on", type(e).__name__, e)
            cluster._metrics_warned = True


def prometheus_url() -> str | None:
    """This driver node's Prometheus endpoint, when Ray runs a metrics agent."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    port = getattr(node, "metrics_export_port", None) if node is not None else None
    ip = getattr(node, "node_ip_address", "127.0.0.1") if node is not None else None
    return f"http://{ip}:{port}/metrics" if port else None
