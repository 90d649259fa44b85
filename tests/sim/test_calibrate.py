"""A calibrated host table: written, read back, turned into a cost model and a simulation of the local cluster.
(The measurements themselves: test_measure.py; against the live cluster: tests/runtime/test_calibrate_cluster.py.)"""

from __future__ import annotations

import pytest

from moe_runtime.config import ModelConfig, parse_config
from moe_runtime.sim.calibrate import write_table
from moe_runtime.sim.hardware import load_table
from moe_runtime.sim.host_cost import HostCostModel
from moe_runtime.sim.simulator import Simulator
from tests.sim.helpers import measured_host_table

TINY = ModelConfig(preset="tiny")


def test_table_roundtrip(tmp_path):
    path = write_table(measured_host_table(cores=2), tmp_path / "host.yaml")
    assert path.read_text().startswith("# Host cost table")
    t = load_table(path)
    assert t.kind == "host" and t.host_cores == 2 and t.links["intra_node"] == t.links["loopback"]
    same = HostCostModel.build(t, TINY, 32, 4)
    assert same.expert_s_per_row == pytest.approx(2e-6) and same.expert_curve == ((1, 8, 32), (1.2e-5, 3e-5, 8e-5),
                                                                                 (2.5e-5, 6e-5, 1.8e-4))  # fmt: skip
    bigger = HostCostModel.build(t, ModelConfig(preset="small"), 32, 4)  # scaled by FLOPs per row: 4 * 4 = 16x
    assert bigger.expert_s_per_row == pytest.approx(16 * 2e-6) and bigger.expert_curve is None
    assert same.allreduce_bandwidth == 1e9
    cfg = parse_config({"model": {"preset": "tiny"}, "sim": {"hardware": str(path)}})
    sim = Simulator.from_config(cfg)
    assert sim.cost.table.kind == "host" and sim.layout.num_actors == cfg.cluster.expert_actors
    res = sim.run_step(sim.synthetic("zipf", tokens_per_worker=256).step(0))
    assert res.step_time_s > 0 and res.layout == "host" and res.phases["cpu_work_s"] > 0
