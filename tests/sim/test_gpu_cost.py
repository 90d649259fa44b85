"""The GPU cost model: roofline costs from a datasheet table; its links for gradient sync."""

from __future__ import annotations

import pytest

from moe_runtime.config import ModelConfig
from moe_runtime.model.accounting import count_params
from moe_runtime.sim.gpu_cost import GpuCostModel
from moe_runtime.sim.hardware import load_table

M32 = ModelConfig(preset="yuan-m32")


def test_gpu_costs_follow_flops_and_the_roofline():
    h = load_table("h100")
    c = GpuCostModel.build(h, M32, seq_len=4096, wire_bytes=2)
    per_row = 6 * 2048 * 8192 / (h.peak_flops * h.mfu_expert)
    assert c.expert_s_per_row == pytest.approx(per_row)
    floor = count_params(M32).expert_params * 2 / h.hbm_bandwidth  # one read of the bf16 weights
    assert c.expert_time(1) == pytest.approx(h.kernel_overhead_s + floor)
    assert c.expert_time(8192) == pytest.approx(h.kernel_overhead_s + 8192 * per_row)
    assert c.expert_time(0) == 0.0
    assert c.message_bytes(10) == 10 * 2048 * 2 + 256
    # A100 is slower at everything
    a = GpuCostModel.build(load_table("a100"), M32, seq_len=4096, wire_bytes=2)
    assert a.expert_time(4096) > c.expert_time(4096) and a.dense_time(4096) > c.dense_time(4096)


def test_gradient_sync_uses_nvlink_inside_a_node_and_infiniband_across():
    h = load_table("h100")
    c = GpuCostModel.build(h, M32, seq_len=4096, wire_bytes=2)
    assert c.dense_sync_link(False) == c.replica_sync_link(False) == h.links["intra_node"]
    assert c.dense_sync_link(True) == c.replica_sync_link(True) == h.links["inter_node"]
