"""benchmarks/rebalance.py: the combined JSON keeps the single script's fields, filled by the parts' code."""

from __future__ import annotations

import json

import pytest

from benchmarks import rebalance, rebalance_cluster, rebalance_synthetic

# Every top-level field of runs/bench/rebalance.json before the split into rebalance_*.py (others read them).
COMBINED_FIELDS = {
    "bench", "balancedness_ours", "balancedness_eplb", "bytes_moved_ours_vs_eplb",
    "bytes_moved_ours_vs_eplb_raw", "goal_bytes_moved_ours_vs_eplb", "skewed_step_time_static_vs_rebalanced",
    "cluster_part", "cluster_part_reason", "cluster", "headline_note", "policy_params", "quick", "synthetic",
    "recorded", "loadavg_1m", "seconds",
    # issue 19: the gains' spread over interleaved rounds and the second destination's cost
    "skewed_step_gain", "skewed_expert_phase_static_vs_rebalanced", "skewed_expert_phase_gain", "skewed_gain_note",
    "second_destination_cost_s", "second_destination_cost_per_step_s",
}  # fmt: skip


def test_combined_json_fields_and_parts(tmp_path, capsys):
    out = tmp_path / "rebalance.json"
    argv = ["--quick", "--json", "--skip-cluster", "--skip-recorded", "--gpus", "8", "--zipf", "1.2",
            "--layers", "2", "--out", str(out)]  # fmt: skip
    rebalance.main(argv)
    stdout = capsys.readouterr().out.strip().splitlines()
    assert len(stdout) == 1  # --json: the result line only
    result = json.loads(out.read_text())
    assert set(result) == COMBINED_FIELDS
    assert result["bench"] == "rebalance" and result["quick"] is True and result["recorded"] is None
    assert result["cluster_part"] == "not run" and "--skip-cluster" in result["cluster_part_reason"]
    assert result["cluster"] is None and result["skewed_step_time_static_vs_rebalanced"] is None
    # the synthetic part is the standalone script's, run with the same arguments
    alone = rebalance_synthetic.run_synthetic([1.2], [8], [0.02], layers=2, seed=0)
    assert result["synthetic"]["config"] == json.loads(json.dumps(alone["config"]))
    for mine, theirs in zip(result["synthetic"]["cases"], alone["cases"], strict=True):
        for key in ("kind", "copies_ours", "copies_eplb_aligned", "copies_eplb_raw", "balancedness_ours"):
            assert mine[key] == pytest.approx(theirs[key]), key
    for key, value in rebalance_synthetic.headline(alone).items():
        assert result[key] == pytest.approx(value), key


def test_cluster_part_is_skipped_under_quick_without_starting_ray():
    part = rebalance_cluster.cluster_part(quick=True, cluster_in_quick=False, seed=0)
    assert part == {
        "skewed_step_time_static_vs_rebalanced": None,
        "skewed_step_gain": None, "skewed_expert_phase_static_vs_rebalanced": None, "skewed_expert_phase_gain": None,
        "skewed_gain_note": None, "second_destination_cost_s": None, "second_destination_cost_per_step_s": None,
        "cluster_part": "not run",
        "cluster_part_reason": rebalance_cluster.CLUSTER_QUICK_REASON,
        "cluster": None,
    }
