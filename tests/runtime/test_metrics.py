"""Cluster metrics on Ray's Prometheus endpoint: after training on the session cluster, the endpoint serves the
same numbers `status()["metrics"]` carries (step time and phases, per-expert and per-actor tokens, exchange
p50/p99, rebalance and recovery counters). Bounded wait: Ray exports metrics every few seconds."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from moe_runtime.runtime.metrics import quantile


def test_quantile_nearest_rank():
    assert quantile([], 0.5) is None
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([float(i) for i in range(100)], 0.99) == 98.0


def _samples(body: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in body.splitlines():
        if line.startswith(f"ray_{name}{{"):
            labels, value = line[len(name) + 5:].rsplit("} ", 1)
            out.append((dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return out


@pytest.mark.slow
def test_metrics_on_the_prometheus_endpoint(fresh4):
    c = fresh4
    c.train(2)
    st = c.status()
    snap, url = st["metrics"], st["prometheus_url"]
    assert url and snap["step"] == 1
    want_step = snap["step_seconds"]["step"]
    deadline = time.monotonic() + 90
    body = ""
    while time.monotonic() < deadline:
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        steps = {d["phase"]: v for d, v in _samples(body, "moe_step_seconds")}
        if steps.get("step") == pytest.approx(want_step):
            break
        time.sleep(2)
    else:
        raise AssertionError(f"moe_step_seconds{{phase=step}} = {want_step} not on {url} within 90 s")
    assert set(steps) >= {"step", "dispatch", "expert", "optimizer"}
    experts = {(d["layer"], d["expert"]): v for d, v in _samples(body, "moe_expert_tokens")}
    assert sum(experts.values()) == sum(map(sum, snap["expert_tokens"])) > 0
    actors = {d["actor"]: v for d, v in _samples(body, "moe_actor_tokens")}
    assert [actors[str(a)] for a in range(4)] == snap["actor_tokens"]
    exchange = {d["quantile"]: v for d, v in _samples(body, "moe_exchange_seconds")}
    assert exchange["p50"] == pytest.approx(snap["exchange_seconds"]["p50"]) and exchange["p99"] >= exchange["p50"] > 0
    assert snap["rebalances_total"] == c.scheduler.rebalances and snap["recoveries_total"] == c.recoveries
