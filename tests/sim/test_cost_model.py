"""Cost tables (GPU datasheet tables, calibrated host tables) and the derived per-call costs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_runtime.config import ModelConfig, parse_config
from moe_runtime.model.accounting import count_params
from moe_runtime.sim import calibrate as cal
from moe_runtime.sim.cost_model import CostModel, CostModelError, HardwareTable, Link, load_table, table_names

M32 = ModelConfig(preset="yuan-m32")


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


def test_gpu_costs_follow_flops_and_the_roofline():
    h = load_table("h100")
    c = CostModel.build(h, M32, seq_len=4096, wire_bytes=2)
    per_row = 6 * 2048 * 8192 / (h.peak_flops * h.mfu_expert)
    assert c.expert_s_per_row == pytest.approx(per_row)
    floor = count_params(M32).expert_params * 2 / h.hbm_bandwidth  # one read of the bf16 weights
    assert c.expert_time(1) == pytest.approx(h.kernel_overhead_s + floor)
    assert c.expert_time(8192) == pytest.approx(h.kernel_overhead_s + 8192 * per_row)
    assert c.expert_time(0) == 0.0
    assert c.message_bytes(10) == 10 * 2048 * 2 + 256
    # A100 is slower at everything
    a = CostModel.build(load_table("a100"), M32, seq_len=4096, wire_bytes=2)
    assert a.expert_time(4096) > c.expert_time(4096) and a.dense_time(4096) > c.dense_time(4096)


def test_bad_tables_are_named(tmp_path):
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


def test_in_process_calibration_pieces_and_table_roundtrip(tmp_path):
    torch.set_num_threads(1)
    model = ModelConfig(preset="tiny")
    ex = cal.measure_experts(model.hidden_size, model.ffn_hidden_size, quick=True)
    assert ex["s_per_row"] >= 0 and ex["bwd_times_s"][-1] > ex["times_s"][-1]  # backward costs more than forward
    dense = cal.measure_dense(model, 32, quick=True)
    head = cal.measure_head(model, 32, quick=True)
    codec = cal.measure_codec(model.hidden_size, torch.float32, quick=True)
    # tiny model: per-token slopes are small against noise (the fit clamps them at >= 0); the times are real
    assert min(dense["s_per_token"], head["s_per_token"], codec["s_per_byte"]) >= 0
    assert all(t > 0 for t in dense["times_s"] + head["times_s"] + ex["times_s"] + ex["bwd_times_s"])
    # (measure_optimizer is left to the benchmark: its first AdamW step pays 2-9 s of lazy torch imports here)
    table = {
        "name": "calibrated-host", "kind": "host", "host_cores": 2, "step_overhead_s": 0.0,
        "links": {"loopback": {"alpha_s": 2e-5, "cpu_s": 3e-4, "bandwidth": 4e8}},
        "measured": {"model": {"hidden_size": 64, "ffn_hidden_size": 128}, "expert": ex, "dense": dense,
                     "head": head, "optimizer": {"s_per_param": 1e-8}, "codec": codec,
                     "allreduce": {"alpha_s": 1e-4, "bandwidth": 1e9}},
    }  # fmt: skip
    path = cal.write_table(table, tmp_path / "host.yaml")
    t = load_table(path)
    assert t.kind == "host" and t.host_cores == 2
    same = CostModel.build(t, model, 32, 4)
    assert same.expert_s_per_row == pytest.approx(ex["s_per_row"])
    bigger = CostModel.build(t, ModelConfig(preset="small"), 32, 4)  # scaled by FLOPs per row: 4 * 4 = 16x
    assert bigger.expert_s_per_row == pytest.approx(16 * ex["s_per_row"])
    assert same.allreduce_bandwidth == 1e9
    cfg = parse_config({"model": {"preset": "tiny"}, "sim": {"hardware": str(path)}})
    from moe_runtime.sim.simulator import Simulator

    sim = Simulator.from_config(cfg)
    assert sim.cost.host and sim.layout.num_actors == cfg.cluster.expert_actors
    assert sim.run_step(sim.synthetic("zipf", tokens_per_worker=256).step(0)).step_time_s > 0


def test_distinct_experts_covers_the_model_up_to_a_cap():
    tiny = ModelConfig(preset="tiny")
    assert cal.distinct_experts(tiny) == tiny.num_layers * tiny.num_experts  # small: every expert of the model
    assert cal.distinct_experts(M32) == 1  # one Yuan-M32 expert is 201 MB: the 256 MB cap


def test_scaling_a_host_table_scales_the_simulated_step():
    """A machine twice as loaded (every process stretched 2x): every cost doubles, so does the step."""
    from moe_runtime.sim.simulator import Layout, Simulator
    from tests.sim.helpers import host_table

    table = host_table(cores=2)
    twice = cal.scale_host_table(table, 2.0)
    assert twice.links["loopback"].bandwidth == pytest.approx(table.links["loopback"].bandwidth / 2)
    assert twice.measured["expert"]["s_per_row"] == pytest.approx(2 * table.measured["expert"]["s_per_row"])
    model = ModelConfig(preset="tiny")
    lay = Layout.separate(2, 4, gpus_per_node=6)
    one = Simulator(CostModel.build(table, model, 32, 4), lay)
    two = Simulator(CostModel.build(twice, model, 32, 4), lay)
    trace = one.synthetic("zipf", tokens_per_worker=128)
    assert two.run_step(trace.step(0)).step_time_s == pytest.approx(
        2 * one.run_step(trace.step(0)).step_time_s
    )
    with pytest.raises(ValueError, match="gpu"):
        cal.scale_host_table(load_table("h100"), 2.0)
    assert cal.machine_state(repeats=2)["stretch"] > 0


def test_host_costs_interpolate_the_measured_points():
    """Between measured points the cost is piecewise linear through them (a line through all of them missed the
    small-row expert times 1.4-2.7x); beyond the last point it grows by the fitted slope; another model size
    falls back to the FLOP-scaled lines."""
    from tests.sim.helpers import host_table

    t = host_table(cores=2)
    ex = dict(t.measured["expert"], rows=[1, 4, 16], times_s=[1e-4, 2e-4, 1e-3], bwd_times_s=[3e-4, 5e-4, 2e-3],
              s_per_row=5e-5, bwd_s_per_row=1e-4)  # fmt: skip
    de = dict(t.measured["dense"], tokens=[32, 64], times_s=[1e-3, 3e-3], bwd_times_s=[2e-3, 7e-3], s_per_token=2e-5)
    measured = dict(t.measured, expert=ex, dense=de)
    import dataclasses

    tiny = ModelConfig(preset="tiny")
    table = dataclasses.replace(t, measured=dict(measured, model={"hidden_size": tiny.hidden_size,
                                                                  "ffn_hidden_size": tiny.ffn_hidden_size}))  # fmt: skip
    c = CostModel.build(table, tiny, 32, 4)
    got = c.expert_time(np.array([0, 1, 2, 4, 10, 16, 20]))
    np.testing.assert_allclose(got, [0, 1e-4, 1e-4 + 1e-4 / 3, 2e-4, 6e-4, 1e-3, 1e-3 + 4 * 5e-5])
    np.testing.assert_allclose(c.expert_time(np.array([10]), backward=True), [1.25e-3])
    np.testing.assert_allclose(c.dense_time(np.array([16, 48, 64, 74])), [5e-4, 2e-3, 3e-3, 3e-3 + 10 * 2e-5])
    np.testing.assert_allclose(c.dense_bwd_time(np.array([48])), [4.5e-3])
    doubled = CostModel.build(cal.scale_host_table(table, 2.0), tiny, 32, 4)
    np.testing.assert_allclose(doubled.expert_time(np.array([10])), [1.2e-3])
    small = CostModel.build(table, ModelConfig(preset="small"), 32, 4)  # other size: the scaled line
    assert small.expert_curve is None
    assert small.expert_time(np.array([10]))[0] == pytest.approx(small.expert_fixed_s + 10 * small.expert_s_per_row)


def test_scaling_per_role_touches_only_that_role():
    from tests.sim.helpers import host_table

    from moe_runtime.sim.cost_model import scale_host_roles

    t = host_table(cores=2)
    model = ModelConfig(preset="tiny")
    base = CostModel.build(t, model, 32, 4)
    c = CostModel.build(scale_host_roles(t, 2.0, 3.0, 5.0), model, 32, 4)
    assert c.expert_s_per_row == pytest.approx(2 * base.expert_s_per_row)
    assert c.dense_s_per_token == pytest.approx(3 * base.dense_s_per_token)
    assert c.head_s_per_token == pytest.approx(3 * base.head_s_per_token)
    assert c.optimizer_s_per_param == pytest.approx(5 * base.optimizer_s_per_param)
    assert c.links["loopback"].cpu_s == pytest.approx(5 * base.links["loopback"].cpu_s)
    assert c.links["loopback"].bandwidth == pytest.approx(base.links["loopback"].bandwidth / 5)
    with pytest.raises(ValueError, match="dense scale = 0.0: must be > 0"):
        scale_host_roles(t, 1.0, 0.0, 1.0)
