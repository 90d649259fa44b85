"""Smoke test of benchmarks/rebalance.py: the --quick synthetic part runs, its JSON has the keys, numbers are sane."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("rebalance_bench", ROOT / "benchmarks" / "rebalance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "rebalance.json"
    # The quick synthetic part (24 layers, 8 and 16 GPUs) at one Zipf exponent, without the training run.
    argv = ["--quick", "--json", "--skip-cluster", "--skip-recorded", "--zipf", "1.2", "--out", str(out)]
    return bench.main(argv), out


def test_quick_json_keys_and_file(quick_run, capsys):
    result, out = quick_run
    on_disk = json.loads(out.read_text())
    for key in (
        "balancedness_ours",
        "balancedness_eplb",
        "bytes_moved_ours_vs_eplb",
        "bytes_moved_ours_vs_eplb_raw",
        "skewed_step_time_static_vs_rebalanced",
        "cluster_part",
        "synthetic",
    ):
        assert key in on_disk, key
    assert on_disk["skewed_step_time_static_vs_rebalanced"] is None and on_disk["cluster_part"] == "not run"
    assert on_disk["recorded"] is None
    assert on_disk["balancedness_ours"] == pytest.approx(result["balancedness_ours"])
    cases = on_disk["synthetic"]["cases"]
    assert {(c["kind"], c["gpus"]) for c in cases} == {
        ("cold", 8),
        ("cold", 16),
        ("steady", 8),
        ("steady", 16),
    }


def test_quick_numbers_are_sane(quick_run):
    result, _ = quick_run
    assert 0 < result["balancedness_eplb"] <= 1 and 0 < result["balancedness_ours"] <= 1
    # The policy's EPLB floor: never less balanced than EPLB on the same snapshot (unlimited budget).
    assert result["balancedness_ours"] >= result["balancedness_eplb"] - 1e-9
    assert 0 <= result["bytes_moved_ours_vs_eplb"] <= 1.0
    assert result["bytes_moved_ours_vs_eplb_raw"] <= result["bytes_moved_ours_vs_eplb"] + 1e-12
    for c in result["synthetic"]["cases"]:
        assert c["slots_per_gpu"] == -(-32 // c["gpus"]) + 1
        for k in ("balancedness_ours", "balancedness_eplb", "balancedness_before_ours"):
            assert 0 < c[k] <= 1 + 1e-12, (k, c)
        assert c["copies_eplb_aligned"] <= c["copies_eplb_raw"]  # relabelling can only save copies
        assert c["bytes_ours"] == c["copies_ours"] * 3 * 2048 * 8192 * 12
        assert 0 <= c["churn_eplb_raw"] <= 1 and c["decide_wall_s"] > 0
        if c["kind"] == "cold":
            assert c["balancedness_before_ours"] < 0.5  # contiguous placement under Zipf(1.2) is skewed
            assert c["balancedness_ours"] > 0.9 and c["copies_ours"] > 0
        else:
            assert c["noise"] == 0.02
            # EPLB reshuffles under 2% noise; the policy moves far less (here: usually nothing).
            assert c["copies_ours"] < c["copies_eplb_aligned"]
            assert c["churn_eplb_raw"] > 0.2
