"""benchmarks/step.py's overlap summary and benchmarks/_common.py's ratio_spread: pure functions, no cluster
(the benchmark itself runs in `make bench`)."""

from __future__ import annotations

import pytest

from benchmarks import step
from benchmarks._common import ratio_spread


def test_ratio_spread_pairs_rounds_and_tests_the_sign():
    s = ratio_spread([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0])
    assert s["ratios"] == [0.5] * 7 and s["median"] == 0.5 and (s["min"], s["max"]) == (0.5, 0.5)
    assert s["rounds_below_1"] == 7 and s["sign_test_p"] == pytest.approx(2 / 2**7)
    assert s["within_noise"] is False  # 7 of 7 rounds below 1: a real difference
    mixed = ratio_spread([0.9, 1.1, 0.8, 1.2], [1.0, 1.0, 1.0, 1.0])
    assert mixed["median"] == pytest.approx(1.0) and mixed["within_noise"] is True
    assert mixed["min"] == pytest.approx(0.8) and mixed["max"] == pytest.approx(1.2)
    few = ratio_spread([1.0] * 4, [2.0] * 4)  # 4 of 4 below 1: p = 0.125, too few rounds to call it
    assert few["within_noise"] is True and few["sign_test_p"] == pytest.approx(0.125)


def test_ratio_spread_rejects_unpaired_samples():
    with pytest.raises(ValueError, match="got 2 and 3 samples"):
        ratio_spread([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="got 0 and 0 samples"):
        ratio_spread([], [])


def test_overlap_config_states_the_layout():
    cfg = step.overlap_config("one_per_core")
    c = cfg.cluster
    assert (c.router_workers, c.expert_actors, c.torch_threads) == (1, 1, 1)
    assert cfg.model.preset == "small" and (cfg.train.batch_size, cfg.train.seq_len) == (16, 128)
    legacy = step.overlap_config("local_yaml").cluster
    assert (legacy.router_workers, legacy.expert_actors) == (2, 4)


def _timings(fb: float, worker_main: float, handler: float) -> dict:
    return {"forward_backward_s": fb, "worker_cpu_s": worker_main * 1.1, "worker_main_cpu_s": worker_main,
            "expert_handler_cpu_s": handler}  # fmt: skip


def test_summarize_overlap_reports_spread_layout_and_limit():
    cfg = step.overlap_config("one_per_core")
    none = [1.0, 1.2, 1.1, 1.0, 1.3, 1.0, 1.1]
    tbo = [0.7, 0.9, 0.8, 0.8, 0.9, 0.7, 0.8]
    parts = {"none": [_timings(0.9, 0.45, 0.40)] * 7, "two_batch": [_timings(0.6, 0.5, 0.45)] * 7}
    out = step.summarize_overlap(cfg, {"none": none, "two_batch": tbo}, parts)
    ratios = [a / b for a, b in zip(tbo, none)]
    assert out["overlap_vs_none_step_time"] == pytest.approx(sorted(ratios)[3])
    assert out["overlap_vs_none_range"] == pytest.approx([min(ratios), max(ratios)])
    assert out["overlap_vs_none_within_noise"] is False
    assert out["layout"] == {"router_workers": 1, "expert_actors": 1, "torch_threads": 1, "micro_batches": 1,
                             "cpus": out["layout"]["cpus"]}  # fmt: skip
    # limit: the none step (median 1.1) with forward+backward (0.9) shrunk to the busier party's CPU (0.45) or
    # all CPU over the cores ((0.495 + 0.40) / cpus)
    cpus = out["layout"]["cpus"]
    assert out["overlap_limit_vs_none"] == pytest.approx((1.1 - 0.9 + max(0.45, 0.895 / cpus)) / 1.1)
    assert out["by_mode"]["none"]["worker_cpu_per_wall"] == pytest.approx(0.45 * 1.1 / 0.9)
