"""benchmarks/_sim_overlap.py (sim_accuracy's overlap set-up) on a recorded run made up here: every step simulated
in its own mode, the per-round ratios paired, the ratio's error against the measured one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from benchmarks._sim_overlap import OVERLAP_SETUP, overlap_config, simulate_overlap
from moe_runtime.sim.hardware import HardwareTable
from moe_runtime.sim.simulator import Simulator
from tests.sim.helpers import measured_host_table


def _table_for(table: HardwareTable, cores: float, scale: float, overhead: float) -> HardwareTable:
    return dataclasses.replace(table, host_cores=cores, step_overhead_s=overhead)


def test_simulate_overlap_pairs_rounds_and_predicts_each_mode(tmp_path):
    cfg = overlap_config(tmp_path)
    m = cfg.model
    tokens = OVERLAP_SETUP["batch_size"] * OVERLAP_SETUP["seq_len"]
    rng = np.random.default_rng(0)
    counts = np.stack([rng.multinomial(tokens * m.top_k, np.full(m.num_experts, 1 / m.num_experts))
                       for _ in range(m.num_layers)])[None]  # [W * M = 1, L, E]  # fmt: skip
    real = {(1, "none"): 1.0, (1, "two_batch"): 0.9, (2, "two_batch"): 1.1, (2, "none"): 1.0}
    steps = [{"mode": mode, "round": r, "counts": counts.tolist(), "real_step_s": t,
              "share": {"cores": 2.0}} for (r, mode), t in real.items()]  # fmt: skip
    rec = {"setup": OVERLAP_SETUP, "rounds": 2, "steps": steps, "ray_round_trip_s": 1e-3}
    table = HardwareTable.from_dict(measured_host_table(cores=2))
    out = simulate_overlap(rec, table, 1.0, 3e-3, tmp_path, _table_for)
    assert out["real_overlap_vs_none"]["ratios"] == pytest.approx([0.9, 1.1])
    sims = {mode: Simulator.from_config(overlap_config(tmp_path, mode), _table_for(table, 2.0, 1.0, 3e-3))
            .run_step(counts) for mode in ("none", "two_batch")}  # fmt: skip
    assert sims["two_batch"].overlap == "two_batch" and sims["none"].overlap == "none"
    predicted = sims["two_batch"].step_time_s / sims["none"].step_time_s
    assert out["sim_overlap_vs_none"]["ratios"] == pytest.approx([predicted, predicted])
    assert out["overlap_ratio_error"] == pytest.approx(predicted / 1.0 - 1.0)  # median of (0.9, 1.1) = 1.0
    assert out["overlap_ratio_error_rounds"] == pytest.approx([predicted / 0.9 - 1, predicted / 1.1 - 1])
    assert out["step_error"]["none"]["median"] == pytest.approx(sims["none"].step_time_s / 1.0 - 1)
