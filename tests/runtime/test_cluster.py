"""Cluster vs the in-process oracle; layout on (simulated) nodes; bad configs fail before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moe_runtime.config import ConfigError, parse_config
from moe_runtime.model.transformer import expert_param_name
from tests.runtime.helpers import make_config

ROOT = Path(__file__).resolve().parents[2]


def test_train_matches_oracle(fresh4, oracle, runtime_tmp):
    c = fresh4
    with pytest.raises(ValueError, match=r"record_trace = '.*trace\.txt': expected a path ending in \.npz"):
        c.train(5, record_trace=runtime_tmp / "trace.txt")
    assert c.step == 0  # rejected before any step
    result = c.train(5, record_trace=runtime_tmp / "trace.npz")
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(oracle.losses[:5]), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(result.aux_losses), torch.tensor(oracle.aux[:5]), rtol=1e-4, atol=1e-7)
    assert result.expert_load == sum(oracle.loads[:5]).tolist()  # same routing, token for token
    assert c.step == 5

    # expert weights read back from the 4 actors == the oracle's stacked [E, ...] weights
    weights = c.expert_weights()
    for layer in range(c.cfg.model.num_layers):
        for w in ("w1", "w2"):
            key = expert_param_name(layer, w)
            torch.testing.assert_close(weights[key], oracle.state_after_5[key], rtol=1e-4, atol=1e-6)
    dense = c.dense_state(worker=1)
    assert set(dense) == set(oracle.state_after_5) - set(weights)
    for k, v in dense.items():
        torch.testing.assert_close(v, oracle.state_after_5[k], rtol=1e-4, atol=1e-6)
    # both data-parallel workers hold identical dense weights
    d0 = c.dense_state(worker=0)
    assert all(torch.equal(d0[k], dense[k]) for k in dense)

    logits = c.forward(oracle.probe)
    torch.testing.assert_close(logits, oracle.logits_after_5, rtol=1e-4, atol=1e-5)

    # the recorded routing trace: per worker and micro-batch, summing to the oracle's load step by step
    from moe_runtime.sim.simulator import Simulator
    from moe_runtime.sim.traces import load_trace

    trace = load_trace(result.extra["trace"])
    m, t = c.cfg.model, c.cfg.train
    chunks = c.cfg.cluster.router_workers * t.micro_batches
    assert trace.counts.shape == (5, chunks, m.num_layers, m.num_experts) and trace.micro_batches == t.micro_batches
    for i in range(5):
        assert trace.counts[i].sum(axis=0).tolist() == oracle.loads[i].tolist()
    per_chunk = t.batch_size // chunks * t.seq_len * m.top_k  # every chunk routes all its tokens k times per layer
    assert (trace.counts.sum(axis=-1) == per_chunk).all()
    Simulator.from_config(c.cfg).check_trace(trace)  # replayable as is

    payload = json.loads(result.to_json())
    assert payload["placement"]["num_actors"] == 4
    assert sum(payload["actor_load"]) == sum(map(sum, payload["expert_load"]))
    assert set(payload["mean_timings"]) >= {"router_s", "dispatch_s", "expert_s", "combine_s", "grad_sync_s",
                                            "optimizer_s"}


def test_status_reports_layout_and_load(fresh4):
    c = fresh4
    c.train_step()
    s = c.status()
    assert s["healthy"] and s["step"] == 1 and len(s["expert_actors"]) == 4 and len(s["router_workers"]) == 2
    gpu_ids = [a["gpu_ids"] for a in s["expert_actors"]]
    assert all(len(g) == 1 for g in gpu_ids) and len({g[0] for g in gpu_ids}) == 4  # one distinct GPU each
    shards = [tuple(map(tuple, a["shards"])) for a in s["expert_actors"]]
    assert sorted(k for sh in shards for k in sh) == [(l, e) for l in range(2) for e in range(8)]
    assert all(a["tokens"] > 0 for a in s["expert_actors"])
    assert all(a["address"].startswith("127.0.0.1:") for a in s["expert_actors"])
    assert len({a["pid"] for a in s["expert_actors"]}) == 4


def test_bad_configs_fail_before_anything_starts(ray_session, runtime_tmp):
    import ray
    from ray.util import placement_group_table

    from moe_runtime.runtime.cluster import Cluster
    from moe_runtime.runtime.ray_env import ClusterStartError

    with pytest.raises(ConfigError, match=r"cluster.expert_actors = 5: needs 5 GPUs but num_gpus = 4"):
        parse_config({"cluster": {"num_gpus": 4, "expert_actors": 5}})

    before_pgs = len(placement_group_table())
    before = ray.available_resources().get("GPU", 0)
    bad = [
        ({"expert_actors": 8, "num_gpus": 8}, r"needs 8 GPUs; the Ray cluster has 6"),
        ({"expert_actors": 2, "cpus_per_actor": 4.0}, r"cpus_per_actor = 4 x 4 actors needs 16 CPUs"),
        ({"expert_actors": 2, "num_nodes": 4}, r"num_gpus = 6: must split evenly over num_nodes = 4"),
        ({"expert_actors": 2, "num_nodes": 2}, r"num_nodes = 2 but the running Ray has 1 node"),
        ({"expert_actors": 4, "placement_strategy": "STRICT_SPREAD"}, r"STRICT_SPREAD .* 4 actors but .* 1 node"),
        # the session cluster holds 4 of the 6 GPUs: a second 4-actor cluster is refused at once
        ({"expert_actors": 4}, r"only \{'GPU': 2.0\} are free"),
    ]
    for cluster, message in bad:
        with pytest.raises(ClusterStartError, match=message):
            Cluster.start(make_config(runtime_tmp, **cluster))
    cfg = make_config(runtime_tmp)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 6})})
    with pytest.raises(ClusterStartError, match=r"batch_size = 6: must be a multiple of .* = 4"):
        Cluster.start(cfg)
    assert len(placement_group_table()) == before_pgs
    assert ray.available_resources().get("GPU", 0) == before


MULTINODE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    from tests.runtime.helpers import make_config
    from moe_runtime.runtime.cluster import Cluster
    from pathlib import Path
    # 1 worker x 4 micro-batches = the same 4 chunks as the oracle's 2 x 2; 2 actors, one per node
    cfg = make_config(Path({tmp!r}), train={{"micro_batches": 4}}, num_nodes=2, num_gpus=2, expert_actors=2,
                      router_workers=1, placement_strategy="STRICT_SPREAD")
    with Cluster.start(cfg) as c:
        r = c.train(2)
        s = c.status()
        print("RESULT " + json.dumps({{
            "losses": r.losses, "nodes": s["nodes"], "mode": s["ray_mode"],
            "actor_nodes": [a["node_id"] for a in s["expert_actors"]],
            "worker_nodes": [w["node_id"] for w in s["router_workers"]],
            "placement_nodes": s["placement"]["actor_nodes"], "healthy": s["healthy"]}}))
""")


def test_two_simulated_nodes(oracle, runtime_tmp):
    """Own Ray (ray.cluster_utils.Cluster, 2 raylets) in a subprocess: the session Ray stays untouched."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", MULTINODE.format(root=str(ROOT), tmp=str(runtime_tmp / "mn"))],
                          capture_output=True, text=True, timeout=280, env=env, cwd=ROOT, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["mode"] == "multinode" and len(out["nodes"]) == 2 and out["healthy"]
    assert sorted(out["actor_nodes"]) == out["nodes"]  # STRICT_SPREAD: one expert actor on each node
    assert sorted(out["placement_nodes"]) == [0, 1]
    torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(oracle.losses[:2]), rtol=1e-4, atol=0)
