"""The `simulate` command body: JSON, what-if, plot, trace replay, and the calibration it is handed."""

from __future__ import annotations

import json

import pytest
import yaml

from moe_runtime.config import load_config
from moe_runtime.sim import cli_impl
from moe_runtime.sim.cli_impl import simulate_command
from moe_runtime.sim.simulator import Simulator
from tests.sim.helpers import measured_host_table


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
    # the what-if's static side is the command's own simulation of the same trace (two paths, one answer)
    assert wi["static_step_s"] == pytest.approx(obj["step_time_s"]) and wi["static_imbalance"] == obj["imbalance"]
    assert wi["changed"] and wi["rebalanced_imbalance"] < wi["static_imbalance"]
    assert wi["rebalanced_step_s"] != wi["static_step_s"]  # (slower here: A100 links make the new replicas' sync cost)
    assert [r["gpus"] for r in obj["scaling"]][:2] == [8, 16]
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_simulate_command_replays_a_trace_file(tmp_path, capsys):
    path = _config(tmp_path)
    sim = Simulator.from_config(load_config(path))
    trace = sim.synthetic("drift", steps=3, tokens_per_worker=1024, seed=2)
    tf = trace.save(tmp_path / "t.jsonl")
    out = simulate_command(path, trace=str(tf))
    assert out["steps"] == 3 and len(out["step_time_s_per_step"]) == 3
    direct = [r.step_time_s for r in sim.run(trace)]
    assert out["step_time_s_per_step"] == pytest.approx(direct)
    with pytest.raises(ValueError, match="what-if"):
        simulate_command(path, what_if="nonsense")


def test_against_cluster_needs_calibrate():
    with pytest.raises(ValueError, match="--against-cluster: it refines a calibration; add --calibrate"):
        simulate_command("cluster/local.yaml", against_cluster=lambda cfg, table, log: {})


def test_against_cluster_scales_the_calibrated_table(tmp_path, monkeypatch):
    """--calibrate --against-cluster: the cluster's measurement (handed in: sim/ never starts a cluster) goes into
    the written table, and the simulation uses the scaled table."""
    import moe_runtime.sim.calibrate as calibrate

    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "train": {"batch_size": 4, "seq_len": 32},
                                    "cluster": {"num_gpus": 2, "expert_actors": 2, "router_workers": 1}}))  # fmt: skip
    monkeypatch.setattr(calibrate, "calibrate", lambda cfg, log=None: measured_host_table())
    monkeypatch.setattr(cli_impl, "CALIBRATION_DIR", tmp_path / "runs")
    seen = []

    def cluster(cfg, table, log):
        seen.append((cfg.cluster.expert_actors, table.kind, table.cpu_scale))
        log("step 2: ...")
        return {"cpu_scale": 2.0, "step_overhead_s": 0.01, "ray_round_trip_s": 0.003}

    scaled = simulate_command(path, calibrate=True, against_cluster=cluster)
    assert seen == [(2, "host", 1.0)]  # the freshly measured table, not yet scaled
    written = yaml.safe_load((tmp_path / "runs" / "host-tiny.yaml").read_text())
    assert written["cpu_scale"] == 2.0 and written["step_overhead_s"] == 0.01
    assert written["measured"]["cluster"]["ray_round_trip_s"] == 0.003
    plain = simulate_command(path, calibrate=True)
    # every cost doubled, plus the control-plane overhead per step
    assert scaled["step_time_s"] == pytest.approx(2 * plain["step_time_s"] + 0.01)


def test_simulate_command_what_if_overlap(tmp_path, capsys):
    # two 1024-token rows per GPU: the runtime's two halves; one row: nothing to split (ratio 1, a reason)
    two_rows = _config(tmp_path, tokens_per_gpu=2048)
    out = simulate_command(two_rows, what_if="overlap", as_json=True)
    obj = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    wi = obj["what_if"]
    assert wi["splittable"] and obj["overlap"] == "none"  # the command's own step follows transport.overlap
    assert wi["none_step_s"] == pytest.approx(obj["step_time_s"])
    assert obj["overlap_vs_none_step_time"] == pytest.approx(wi["two_batch_step_s"] / wi["none_step_s"])
    assert wi["two_batch_step_s"] != wi["none_step_s"]
    assert wi["messages_per_step"]["two_batch"] == 2 * wi["messages_per_step"]["none"]
    assert out["overlap_vs_none_step_time"] == obj["overlap_vs_none_step_time"]
    one_row = simulate_command(_config(tmp_path, tokens_per_gpu=1024), what_if="overlap")
    assert not one_row["what_if"]["splittable"] and one_row["overlap_vs_none_step_time"] == 1.0


def test_simulate_command_rejects_an_unknown_what_if(tmp_path):
    with pytest.raises(ValueError, match="--what-if 'overlapp': expected one of rebalance, overlap"):
        simulate_command(_config(tmp_path), what_if="overlapp")
