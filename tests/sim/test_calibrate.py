"""Calibrating a host table against the real local cluster (`simulate --calibrate --against-cluster`)."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.config import parse_config
from moe_runtime.sim import calibrate as cal
from moe_runtime.sim.cli_impl import simulate_command
from moe_runtime.sim.cost_model import CostModel
from tests.sim.helpers import host_table


@pytest.mark.slow
def test_cluster_cpu_scale_is_measured_on_the_real_cluster(tmp_path):
    cfg = parse_config({
        "model": {"preset": "tiny"}, "data": {"max_files": 60},
        "train": {"batch_size": 4, "seq_len": 32, "checkpoint_every": 0, "checkpoint_dir": str(tmp_path / "ck")},
        "cluster": {"num_gpus": 2, "expert_actors": 2, "router_workers": 1, "torch_threads": 1},
    })  # fmt: skip
    table = host_table(cores=2)
    logs: list[str] = []
    threads = torch.get_num_threads()
    try:
        out = cal.measure_cluster_cpu_scale(cfg, table, warmup=1, steps=2, log=logs.append)
    finally:
        torch.set_num_threads(threads)
    assert len(out["cluster_cpu_s"]) == len(out["table_cpu_s"]) == 2 and len(logs) == 2
    assert all(c > 0 for c in out["cluster_cpu_s"]) and all(t > 0 for t in out["table_cpu_s"])
    assert out["cpu_scale"] == pytest.approx(sum(out["cluster_cpu_s"]) / sum(out["table_cpu_s"]))
    assert 0 < out["step_overhead_s"] < 1.0
    # a table carrying the scale costs that much more, everywhere
    import dataclasses

    scaled = CostModel.build(dataclasses.replace(table, cpu_scale=2.0), cfg.model, 32, 4)
    plain = CostModel.build(table, cfg.model, 32, 4)
    assert scaled.expert_s_per_row == pytest.approx(2 * plain.expert_s_per_row)
    assert scaled.links["loopback"].cpu_s == pytest.approx(2 * plain.links["loopback"].cpu_s)


def test_against_cluster_needs_calibrate():
    with pytest.raises(ValueError, match="--against-cluster: it refines a calibration; add --calibrate"):
        simulate_command("cluster/local.yaml", against_cluster=True)


def test_bad_cpu_scale_is_named():
    from moe_runtime.sim.cost_model import CostModelError, HardwareTable

    d = {"kind": "host", "host_cores": 2, "links": {"loopback": {"alpha_s": 0, "bandwidth": 1}},
         "measured": {p: {} for p in ("expert", "dense", "head", "optimizer", "codec")}}  # fmt: skip
    assert HardwareTable.from_dict(d).cpu_scale == 1.0
    with pytest.raises(CostModelError, match=r"cpu_scale = 0.0: must be > 0"):
        HardwareTable.from_dict({**d, "cpu_scale": 0})
