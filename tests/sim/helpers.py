"""Shared builders for the simulator tests: tables with chosen costs, traces with exact counts."""

from __future__ import annotations

import numpy as np

from moe_runtime.config import ModelConfig
from moe_runtime.sim.cost_model import CostModel
from moe_runtime.sim.hardware import LINK_CLASSES, HardwareTable
from moe_runtime.sim.simulator import build_cost_model
from moe_runtime.sim.traces import RoutingTrace, zipf_shares

TINY = ModelConfig(preset="tiny")  # d 64, 8 experts, top-2, 2 layers


def gpu_table(alpha: float = 1e-5, bandwidth: float = 1e9, compute: bool = False, **overrides) -> HardwareTable:
    """A GPU table; with compute=False every compute cost is ~0 (1e30 FLOP/s) so only transfers remain."""
    links = {c: {"alpha_s": alpha, "bandwidth": bandwidth} for c in LINK_CLASSES}
    d = {
        "name": "test", "kind": "gpu", "links": links,
        "peak_flops": 1e14 if compute else 1e30, "mfu_dense": 0.5, "mfu_expert": 0.5,
        "hbm_bandwidth": 1e12 if compute else 1e30,
        "kernel_overhead_s": 1e-5 if compute else 0.0, "layer_overhead_s": 2e-5 if compute else 0.0,
        "optimizer_bytes_per_param": 30,
    }  # fmt: skip
    d.update(overrides)
    return HardwareTable.from_dict(d)


def host_table(cores: int = 2, expert_s_per_row: float = 1e-4, alpha: float = 1e-5, cpu_s: float = 1e-4) -> HardwareTable:
    return HardwareTable.from_dict({
        "name": "host-test", "kind": "host", "host_cores": cores,
        "links": {"loopback": {"alpha_s": alpha, "cpu_s": cpu_s, "bandwidth": 5e8}},
        "measured": {
            "expert": {"fixed_s": 1e-5, "s_per_row": expert_s_per_row, "backward_factor": 2.0},
            "dense": {"fixed_s": 1e-4, "s_per_token": 1e-6, "backward_factor": 2.0},
            "head": {"fixed_s": 1e-4, "s_per_token": 1e-6, "backward_factor": 2.0},
            "optimizer": {"s_per_param": 1e-9},
            "codec": {"fixed_s": 1e-5, "s_per_byte": 1e-10},
        },
    })  # fmt: skip


def measured_host_table(cores: int = 2) -> dict:
    """A host table as ``calibrate.calibrate`` returns it, for the tiny model (numbers chosen, not measured)."""
    return {
        "name": "calibrated-host", "kind": "host", "host_cores": cores, "step_overhead_s": 0.0,
        "grad_bytes_per_param": 4,
        "links": {"loopback": {"alpha_s": 2e-5, "cpu_s": 3e-4, "bandwidth": 4e8}},
        "measured": {
            "model": {"preset": "tiny", "hidden_size": TINY.hidden_size, "ffn_hidden_size": TINY.ffn_hidden_size},
            "expert": {"fixed_s": 1e-5, "s_per_row": 2e-6, "bwd_fixed_s": 2e-5, "bwd_s_per_row": 5e-6,
                       "rows": [1, 8, 32], "times_s": [1.2e-5, 3e-5, 8e-5], "bwd_times_s": [2.5e-5, 6e-5, 1.8e-4]},
            "dense": {"fixed_s": 1e-4, "s_per_token": 1e-6, "backward_factor": 2.0, "tokens": [32, 64],
                      "times_s": [1.3e-4, 1.6e-4], "bwd_times_s": [2.7e-4, 3.3e-4]},
            "head": {"fixed_s": 5e-5, "s_per_token": 5e-7, "backward_factor": 2.0},
            "optimizer": {"s_per_param": 1e-8},
            "codec": {"fixed_s": 5e-6, "s_per_byte": 1e-10},
            "allreduce": {"alpha_s": 1e-4, "bandwidth": 1e9},
        },
    }  # fmt: skip


def cost(table: HardwareTable, model: ModelConfig = TINY, wire: int = 4) -> CostModel:
    return build_cost_model(table, model, seq_len=64, wire_bytes=wire)


def exact_trace(shares_le: np.ndarray, chunks: int, tokens: int, top_k: int, steps: int = 1) -> RoutingTrace:
    """Every chunk sends round(tokens * k * share) copies to each expert (no sampling noise)."""
    counts = np.rint(shares_le * tokens * top_k).astype(np.int64)
    return RoutingTrace(np.broadcast_to(counts, (steps, chunks, *counts.shape)).copy(), top_k)


def zipf_exact(model: ModelConfig, s: float, chunks: int, tokens: int, seed: int = 0) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    base = zipf_shares(model.num_experts, s, model.top_k)
    shares = np.stack([base[np.argsort(rng.permutation(model.num_experts))] for _ in range(model.num_layers)])
    return exact_trace(shares, chunks, tokens, model.top_k)
