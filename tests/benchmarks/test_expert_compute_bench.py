"""benchmarks/expert_compute.py on tiny shapes: the JSON fields the checks read (issue 19), their per-round spread,
and the forward+backward section --quick now includes. No timing is asserted, only the report's consistency."""

from __future__ import annotations

import json

from benchmarks import expert_compute


def test_quick_report_fields_and_spread(tmp_path):
    out = tmp_path / "expert_compute.json"
    argv = ["--quick", "--json", "--sizes", "8,24", "--experts", "4", "--hidden", "16", "--ffn", "16", "--threads", "1",
            "--out", str(out)]
    res = expert_compute.main(argv)
    assert json.loads(out.read_text())["grouped_vs_loop_min"] == res["grouped_vs_loop_min"]
    assert [r["tokens"] for r in res["forward"]] == [8, 24] == [r["tokens"] for r in res["forward_backward"]]
    for r in res["forward"] + res["forward_backward"]:
        lo, hi = r["grouped_vs_loop_range"]
        spread = r["grouped_vs_loop_spread"]
        assert lo <= r["grouped_vs_loop"] <= hi and spread["rounds"] == r["repeats"]
        assert (spread["min"], spread["max"]) == (lo, hi) and spread["median"] == r["grouped_vs_loop"]
        assert r["path"] in ("padded", "fused", "loop")
    assert res["grouped_vs_loop_min"] == min(r["grouped_vs_loop"] for r in res["forward"])
    worst = min(res["forward"], key=lambda r: r["grouped_vs_loop"])
    assert res["grouped_vs_loop_min_tokens"] == worst["tokens"]
    assert res["grouped_vs_loop_min_within_noise"] == worst["grouped_vs_loop_spread"]["within_noise"]
    small = res["forward"][0]
    assert res["grouped_vs_floor_small"] == small["grouped_vs_floor"] > 0
    lo, hi = res["grouped_vs_floor_small_range"]
    assert lo <= res["grouped_vs_floor_small"] <= hi
    assert res["fwdbwd_grouped_vs_loop_min"] == min(r["grouped_vs_loop"] for r in res["forward_backward"])
    assert res["goal_grouped_vs_loop_min"] == 0.95 and abs(res["goal_grouped_vs_floor_small"] - 1 / 1.4) < 1e-12
