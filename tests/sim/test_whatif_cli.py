"""The rebalance what-if (scheduler placement vs static) and the `simulate` command body."""

from __future__ import annotations

import json

import pytest
import yaml

from moe_runtime.config import ModelConfig, SchedulerConfig
from moe_runtime.sim.cli_impl import simulate_command
from moe_runtime.sim.cost_model import load_table
from moe_runtime.sim.simulator import Layout, Simulator
from moe_runtime.sim.whatif import rebalance_whatif
from tests.sim.helpers import cost, zipf_exact

M = ModelConfig(preset="yuan-m32", num_layers=2, num_experts=16)


def test_scheduler_placement_beats_static_on_zipf():
    sim = Simulator(cost(load_table("h100"), M, wire=2), Layout.colocated(8, 8))
    trace = sim.synthetic("zipf", steps=2, tokens_per_worker=2048, zipf_s=1.2, seed=1)
    res = rebalance_whatif(sim, trace, cfg=SchedulerConfig(min_gain=0.0))
    assert res.changed and res.placement.version == 1
    assert res.rebalanced_imbalance < res.static_imbalance
    assert res.speedup > 1.2, res.to_dict()
    assert res.static_step_s == pytest.approx(sum(r.step_time_s for r in sim.run(trace)) / 2)
    assert res.bytes_to_move > 0 and res.move_time_s > 0
    json.dumps(res.to_dict())


def test_replicas_cost_gradient_sync():
    # the policy balances tokens; every new replica also joins a gradient all-reduce, which the what-if counts:
    # with few tokens per GPU on slow links the sync growth can outweigh the balance gain
    sim = Simulator(cost(load_table("a100"), M, wire=2), Layout.colocated(8, 4))
    trace = sim.synthetic("zipf", steps=2, tokens_per_worker=1024, zipf_s=1.0)
    res = rebalance_whatif(sim, trace, cfg=SchedulerConfig())
    assert res.changed
    assert res.rebalanced["phases"]["forward_backward_s"] < res.static["phases"]["forward_backward_s"]
    assert res.rebalanced["phases"]["grad_sync_s"] > res.static["phases"]["grad_sync_s"]


def test_uniform_load_leaves_the_placement():
    sim = Simulator(cost(load_table("h100"), M, wire=2), Layout.colocated(8, 8))
    trace = zipf_exact(M, 0.0, 8, 2048)
    res = rebalance_whatif(sim, trace, cfg=SchedulerConfig(min_gain=0.05))
    assert not res.changed and res.speedup == 1.0


def _config(tmp_path, **sim) -> str:
    cfg = {
        "model": {"preset": "yuan-m32", "num_layers": 2, "num_experts": 16},
        "train": {"batch_size": 8, "seq_len": 1024},
        "cluster": {"ray_address": "auto", "num_gpus": 8, "expert_actors": 8, "router_workers": 8},
        "transport": {"wire_dtype": "bfloat16"},
        "sim": {"gpus": 8, "gpus_per_node": 4, "tokens_per_gpu": 1024, "hardware": "a100", "trace": "zipf",
                "zipf_s": 1.0, **sim},
    }  # fmt: skip
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_simulate_command_json_what_if_and_plot(tmp_path, capsys):
    out = simulate_command(_config(tmp_path), steps=2, what_if="rebalance", plot=tmp_path / "p.png", as_json=True)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    obj = json.loads(last)
    for key in ("step_time_s", "per_layer_s", "gpu_busy_fraction", "bytes_moved_per_step", "imbalance"):
        assert key in obj
    assert obj["step_time_s"] == pytest.approx(out["step_time_s"])
    assert len(obj["per_layer_s"]) == 2 and len(obj["gpu_busy_fraction"]) == 8
    assert obj["layout"] == "colocated" and obj["hardware"] == "a100"
    wi = obj["what_if"]
    assert wi["speedup"] == pytest.approx(wi["static_step_s"] / wi["rebalanced_step_s"])
    assert wi["rebalanced_imbalance"] < wi["static_imbalance"]
    assert [r["gpus"] for r in obj["scaling"]][:2] == [8, 16]
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_simulate_command_replays_a_trace_file(tmp_path, capsys):
    path = _config(tmp_path)
    sim = Simulator.from_config(__import__("moe_runtime.config", fromlist=["load_config"]).load_config(path))
    trace = sim.synthetic("drift", steps=3, tokens_per_worker=1024, seed=2)
    tf = trace.save(tmp_path / "t.jsonl")
    out = simulate_command(path, trace=str(tf))
    assert out["steps"] == 3 and len(out["step_time_s_per_step"]) == 3
    direct = [r.step_time_s for r in sim.run(trace)]
    assert out["step_time_s_per_step"] == pytest.approx(direct)
    with pytest.raises(ValueError, match="what-if"):
        simulate_command(path, what_if="nonsense")
