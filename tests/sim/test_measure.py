"""In-process calibration timings (experts, dense, head, codec), the cold-expert count, the machine probe."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.config import ModelConfig
from moe_runtime.sim import measure

M32 = ModelConfig(preset="yuan-m32")


def test_in_process_measurements():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = ModelConfig(preset="tiny")
        ex = measure.measure_experts(model.hidden_size, model.ffn_hidden_size, quick=True)
        dense = measure.measure_dense(model, 32, quick=True)
        head = measure.measure_head(model, 32, quick=True)
        codec = measure.measure_codec(model.hidden_size, torch.float32, quick=True)
    finally:
        torch.set_num_threads(threads)
    assert ex["s_per_row"] >= 0 and ex["bwd_times_s"][-1] > ex["times_s"][-1]  # backward costs more than forward
    assert ex["rows"] == [1, 8, 32, 128, 512] and dense["tokens"] == [32, 64, 128] and dense["layers"] == 2
    # tiny model: per-token slopes are small against noise (the fit clamps them at >= 0); the times are real
    assert min(dense["s_per_token"], head["s_per_token"], codec["s_per_byte"]) >= 0
    assert all(t > 0 for t in dense["times_s"] + head["times_s"] + ex["times_s"] + ex["bwd_times_s"])
    # (measure_optimizer is left to the benchmark: its first AdamW step pays 2-9 s of lazy torch imports here)


def test_fit_line_is_least_squares_with_non_negative_terms():
    assert measure.fit_line([1, 2, 3], [3, 5, 7]) == pytest.approx((1.0, 2.0))
    assert measure.fit_line([1, 2, 3], [3, 2, 1]) == pytest.approx((2.0, 0.0))  # falling: the mean, no slope
    assert measure.fit_line([1, 2, 3], [0, 1, 2])[0] == 0.0  # negative intercept: through the origin


def test_distinct_experts_covers_the_model_up_to_a_cap():
    tiny = ModelConfig(preset="tiny")
    assert measure.distinct_experts(tiny) == tiny.num_layers * tiny.num_experts  # small: every expert of the model
    assert measure.distinct_experts(M32) == 1  # one Yuan-M32 expert is 201 MB: the 256 MB cap


def test_machine_state_measures_a_stretch():
    assert measure.machine_state(repeats=2)["stretch"] > 0
