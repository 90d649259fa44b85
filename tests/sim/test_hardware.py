"""Hardware tables: the datasheet tables, parsing errors, and scaling a host table (whole, or per role)."""

from __future__ import annotations

import pytest

from moe_runtime.config import ModelConfig
from moe_runtime.sim.hardware import (
    CostModelError,
    HardwareTable,
    Link,
    load_table,
    scale_host_roles,
    scale_host_table,
    table_names,
)
from moe_runtime.sim.host_cost import HostCostModel
from moe_runtime.sim.layout import Layout
from moe_runtime.sim.simulator import Simulator
from tests.sim.helpers import host_table

TINY = ModelConfig(preset="tiny")


def test_gpu_tables_carry_the_datasheet_numbers():
    assert {"h100", "a100"} <= set(table_names())
    h, a = load_table("h100"), load_table("a100")
    assert h.peak_flops == pytest.approx(989.4e12) and a.peak_flops == pytest.approx(312e12)
    assert h.hbm_bandwidth == pytest.approx(3.35e12) and a.hbm_bandwidth == pytest.approx(2.039e12)
    assert h.links["intra_node"].bandwidth == pytest.approx(450e9 * 0.9)
    assert a.links["intra_node"].bandwidth == pytest.approx(300e9 * 0.9)
    assert h.links["inter_node"].bandwidth == pytest.approx(50e9 * 0.9)  # NDR 400 Gb/s
    assert a.links["inter_node"].bandwidth == pytest.approx(25e9 * 0.9)  # HDR 200 Gb/s


def test_link_is_alpha_beta():
    assert Link(1e-5, 1e9).time(1e6) == pytest.approx(1e-5 + 1e-3)


def test_bad_tables_are_named():
    with pytest.raises(CostModelError, match="kind"):
        HardwareTable.from_dict({"kind": "tpu"})
    with pytest.raises(CostModelError, match="links.intra_node: required"):
        HardwareTable.from_dict({"kind": "gpu", "peak_flops": 1, "mfu_dense": 1, "mfu_expert": 1,
                                 "hbm_bandwidth": 1, "links": {"loopback": {"alpha_s": 0, "bandwidth": 1}}})  # fmt: skip
    with pytest.raises(CostModelError, match="no table"):
        load_table("tpu-v9")
    with pytest.raises(CostModelError, match="measured.expert"):
        HardwareTable.from_dict({"kind": "host", "host_cores": 2,
                                 "links": {"loopback": {"alpha_s": 0, "bandwidth": 1}}, "measured": {}})  # fmt: skip


def test_bad_cpu_scale_is_named():
    d = {"kind": "host", "host_cores": 2, "links": {"loopback": {"alpha_s": 0, "bandwidth": 1}},
         "measured": {p: {} for p in ("expert", "dense", "head", "optimizer", "codec")}}  # fmt: skip
    assert HardwareTable.from_dict(d).cpu_scale == 1.0
    with pytest.raises(CostModelError, match=r"cpu_scale = 0.0: must be > 0"):
        HardwareTable.from_dict({**d, "cpu_scale": 0})


def test_scaling_a_host_table_scales_the_simulated_step():
    """A machine twice as loaded (every process stretched 2x): every cost doubles, so does the step."""
    table = host_table(cores=2)
    twice = scale_host_table(table, 2.0)
    assert twice.links["loopback"].bandwidth == pytest.approx(table.links["loopback"].bandwidth / 2)
    assert twice.measured["expert"]["s_per_row"] == pytest.approx(2 * table.measured["expert"]["s_per_row"])
    lay = Layout.separate(2, 4, gpus_per_node=6)
    one = Simulator(HostCostModel.build(table, TINY, 32, 4), lay)
    two = Simulator(HostCostModel.build(twice, TINY, 32, 4), lay)
    trace = one.synthetic("zipf", tokens_per_worker=128)
    assert two.run_step(trace.step(0)).step_time_s == pytest.approx(2 * one.run_step(trace.step(0)).step_time_s)
    with pytest.raises(ValueError, match="gpu"):
        scale_host_table(load_table("h100"), 2.0)


def test_a_table_carrying_cpu_scale_costs_that_much_more():
    import dataclasses

    table = host_table(cores=2)
    scaled = HostCostModel.build(dataclasses.replace(table, cpu_scale=2.0), TINY, 32, 4)
    plain = HostCostModel.build(table, TINY, 32, 4)
    assert scaled.expert_s_per_row == pytest.approx(2 * plain.expert_s_per_row)
    assert scaled.links["loopback"].cpu_s == pytest.approx(2 * plain.links["loopback"].cpu_s)


def test_scaling_per_role_touches_only_that_role():
    t = host_table(cores=2)
    base = HostCostModel.build(t, TINY, 32, 4)
    c = HostCostModel.build(scale_host_roles(t, 2.0, 3.0, 5.0), TINY, 32, 4)
    assert c.expert_s_per_row == pytest.approx(2 * base.expert_s_per_row)
    assert c.dense_s_per_token == pytest.approx(3 * base.dense_s_per_token)
    assert c.head_s_per_token == pytest.approx(3 * base.head_s_per_token)
    assert c.optimizer_s_per_param == pytest.approx(5 * base.optimizer_s_per_param)
    assert c.links["loopback"].cpu_s == pytest.approx(5 * base.links["loopback"].cpu_s)
    assert c.links["loopback"].bandwidth == pytest.approx(base.links["loopback"].bandwidth / 5)
    with pytest.raises(ValueError, match="dense scale = 0.0: must be > 0"):
        scale_host_roles(t, 1.0, 0.0, 1.0)
