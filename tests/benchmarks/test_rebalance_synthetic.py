"""benchmarks/rebalance_synthetic.py: rows, summaries and headline checked against counts made here from the
plans themselves, and the properties the comparison rests on (EPLB floor, never worse than before, slots)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from benchmarks import rebalance_synthetic as syn
from moe_runtime.config import ModelConfig
from moe_runtime.model.accounting import expert_state_bytes
from moe_runtime.placement import Placement

# The Yuan shape (32 experts) on 8 GPUs, 2 layers instead of 24: the benchmark's own case, small and fast.
ZIPF_S, GPUS, LAYERS, NOISES = 1.2, 8, 2, (0.02, 0.05)
YUAN_BYTES = expert_state_bytes(ModelConfig.from_preset("yuan-m32"))


def replica_set(p: Placement) -> set[tuple[int, int, int]]:
    rows = enumerate(p.replicas)
    return {(layer, e, a) for layer, row in rows for e, actors in enumerate(row) for a in actors}


def independent_copies(old: Placement, new: Placement) -> int:
    return len(replica_set(new) - replica_set(old))


def independent_balancedness(tokens: np.ndarray, p: Placement) -> float:
    """sum_l mean / sum_l max of per-GPU loads, each expert's tokens shared evenly by its replicas."""
    share = np.zeros((p.num_layers, p.num_experts, p.num_actors))
    for layer, e, a in replica_set(p):
        share[layer, e, a] = 1.0 / len(p.replicas[layer][e])
    loads = np.einsum("le,lea->la", tokens, share)
    return float(loads.mean(axis=1).sum() / loads.max(axis=1).sum())


@pytest.fixture(scope="module")
def cases() -> list[syn.CasePlans]:
    return syn.plan_case(ZIPF_S, GPUS, LAYERS, NOISES, seed=0)


@pytest.fixture(scope="module")
def rows(cases) -> list[dict]:
    return [syn.case_row(c, ZIPF_S, YUAN_BYTES) for c in cases]


def test_cases_chain_from_the_contiguous_start(cases):
    cold, *steady = cases
    start = Placement.contiguous(LAYERS, syn.EXPERTS, GPUS, syn.node_map(GPUS))
    assert cold.kind == "cold" and cold.prev_ours == start and cold.prev_eplb == start
    assert [c.kind for c in steady] == ["steady"] * len(NOISES) and [c.noise for c in steady] == list(NOISES)
    for c in steady:  # each steady case re-plans from the cold plans on a noisy copy of the cold load
        assert c.prev_ours == cold.ours.placement
        assert c.prev_eplb == cold.eplb and c.prev_eplb_aligned == cold.eplb_aligned
        assert not np.array_equal(c.snapshot.tokens, cold.snapshot.tokens)
        assert c.snapshot.tokens.sum() == pytest.approx(cold.snapshot.tokens.sum(), rel=0.05)
    assert cold.snapshot.tokens.sum() == LAYERS * GPUS * syn.TOKENS_PER_GPU * syn.TOP_K


def test_rows_match_independent_counts(cases, rows):
    for c, r in zip(cases, rows):
        new = c.ours.placement
        tokens = c.snapshot.tokens
        assert r["kind"] == c.kind and r["gpus"] == GPUS and r["nodes"] == 1 and r["layers"] == LAYERS
        assert r["slots_per_gpu"] == math.ceil(syn.EXPERTS / GPUS) + 1
        for key, placement in (
            ("balancedness_before_ours", c.prev_ours),
            ("balancedness_before_eplb", c.prev_eplb),
            ("balancedness_ours", new),
            ("balancedness_eplb", c.eplb),
        ):
            assert r[key] == pytest.approx(independent_balancedness(tokens, placement), rel=1e-12), key
        n_ours = independent_copies(c.prev_ours, new)
        n_al = independent_copies(c.prev_eplb_aligned, c.eplb_aligned)
        n_raw = independent_copies(c.prev_eplb, c.eplb)
        assert (r["copies_ours"], r["copies_eplb_aligned"], r["copies_eplb_raw"]) == (n_ours, n_al, n_raw)
        assert r["bytes_ours"] == n_ours * YUAN_BYTES
        assert r["bytes_eplb_aligned"] == n_al * YUAN_BYTES and r["bytes_eplb_raw"] == n_raw * YUAN_BYTES
        assert r["replicas_ours"] == len(replica_set(new)) and r["replicas_eplb"] == len(replica_set(c.eplb))
        assert r["churn_ours"] == pytest.approx(n_ours / len(replica_set(new)))
        assert r["churn_eplb_raw"] == pytest.approx(n_raw / len(replica_set(c.eplb)))
        assert r["ours_changed"] == (new != c.prev_ours)


def test_run_counts_bytes_of_a_yuan_expert_state(rows):
    default_rows = syn.run_synthetic([ZIPF_S], [GPUS], NOISES[:1], layers=LAYERS, seed=0)["cases"]
    assert len(default_rows) == 2
    for r, same in zip(default_rows, rows):
        assert r["bytes_ours"] == r["copies_ours"] * YUAN_BYTES
        assert r["copies_ours"] == same["copies_ours"]  # decide is deterministic: the same plans again


def test_plans_keep_the_properties_the_comparison_rests_on(cases, rows):
    slots = math.ceil(syn.EXPERTS / GPUS) + 1
    for c, r in zip(cases, rows):
        for p in (c.ours.placement, c.eplb, c.eplb_aligned):
            per_actor = np.zeros((LAYERS, GPUS), dtype=int)
            for layer, _, a in replica_set(p):
                per_actor[layer, a] += 1
            assert per_actor.max() <= slots  # both sides planned with the same slots per GPU
        # no layer's max rises, so the plan is never less balanced than the one it replaces
        assert r["balancedness_ours"] >= r["balancedness_before_ours"] - 1e-12
        # relabelling EPLB's GPUs permutes loads (balance unchanged) and can only save copies
        b_aligned = independent_balancedness(c.snapshot.tokens, c.eplb_aligned)
        assert b_aligned == pytest.approx(r["balancedness_eplb"])
        assert r["copies_eplb_aligned"] <= r["copies_eplb_raw"]
        if r["ours_changed"]:  # the EPLB floor (unlimited budget) holds whenever the policy proposes a plan
            assert r["balancedness_ours"] >= r["balancedness_eplb"] - 1e-12
    cold, steady_2 = rows[0], rows[1]
    assert cold["balancedness_before_ours"] < 0.5  # the contiguous placement under Zipf(1.2) is skewed
    assert cold["ours_changed"] and cold["copies_ours"] > 0 and cold["balancedness_ours"] > 0.9
    # under 2% noise EPLB reshuffles while the policy keeps its plan
    assert steady_2["noise"] == 0.02 and steady_2["copies_ours"] < steady_2["copies_eplb_aligned"]


def _row(copies_ours: int, copies_al: int, copies_raw: int, b_ours: float, b_eplb: float) -> dict:
    return {"copies_ours": copies_ours, "copies_eplb_aligned": copies_al, "copies_eplb_raw": copies_raw,
            "balancedness_ours": b_ours, "balancedness_eplb": b_eplb, "balancedness_before_ours": 0.5,
            "churn_ours": 0.0, "churn_eplb_aligned": 0.0, "churn_eplb_raw": 0.0, "decide_wall_s": 1.0,
            "decide_cpu_s": 1.0, "eplb_cpu_s": 1.0}  # fmt: skip


def test_summary_ratios_are_of_sums_not_means_of_ratios():
    m = syn.summarize([_row(1, 1, 2, 0.9, 0.8), _row(9, 3, 6, 0.7, 0.75)])
    assert m["bytes_moved_ours_vs_eplb"] == pytest.approx(10 / 4)  # the mean of ratios would be 2.0
    assert m["bytes_moved_ours_vs_eplb_raw"] == pytest.approx(10 / 8)
    assert m["balancedness_ours"] == pytest.approx(0.8) and m["balancedness_eplb"] == pytest.approx(0.775)
    assert m["ours_at_least_as_balanced"] == 1 and m["cases"] == 2
    assert syn.summarize([_row(0, 0, 0, 1.0, 1.0)])["bytes_moved_ours_vs_eplb"] == 1.0  # both moved nothing
    assert syn.summarize([_row(2, 0, 0, 1.0, 1.0)])["bytes_moved_ours_vs_eplb"] is None
    assert syn.summarize([]) == {}


def test_cli_json_matches_its_cases_and_the_printed_line(tmp_path, capsys):
    out = tmp_path / "rebalance_synthetic.json"
    argv = ["--quick", "--gpus", str(GPUS), "--zipf", str(ZIPF_S), "--layers", str(LAYERS), "--out", str(out)]
    syn.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1])["bench"] == "rebalance_synthetic"  # the last stdout line is the result
    printed = json.loads(out.read_text())
    for key in ("bench", "balancedness_ours", "balancedness_eplb", "bytes_moved_ours_vs_eplb",
                "bytes_moved_ours_vs_eplb_raw", "goal_bytes_moved_ours_vs_eplb", "headline_note",
                "policy_params", "quick", "synthetic", "loadavg_1m", "seconds"):  # fmt: skip
        assert key in printed, key
    cases = printed["synthetic"]["cases"]
    kinds = [(c["kind"], c["gpus"], c["noise"]) for c in cases]
    assert kinds == [("cold", GPUS, 0.0), ("steady", GPUS, 0.02)]
    # the headline, recomputed from the per-case rows
    assert printed["bytes_moved_ours_vs_eplb"] == pytest.approx(
        sum(c["copies_ours"] for c in cases) / sum(c["copies_eplb_aligned"] for c in cases)
    )
    assert printed["balancedness_ours"] == pytest.approx(np.mean([c["balancedness_ours"] for c in cases]))
    assert printed["balancedness_eplb"] == pytest.approx(np.mean([c["balancedness_eplb"] for c in cases]))
    # the human-readable line says the same numbers
    m = re.fullmatch(
        r"rebalance_synthetic: B ours ([\d.]+) vs EPLB ([\d.]+), bytes ours/EPLB ([\d.]+) \(raw ([\d.]+)\)",
        lines[-2],
    )
    assert m, lines[-2]
    fields = ("balancedness_ours", "balancedness_eplb", "bytes_moved_ours_vs_eplb",
              "bytes_moved_ours_vs_eplb_raw")  # fmt: skip
    for text, key in zip(m.groups(), fields):
        assert float(text) == pytest.approx(printed[key], abs=5e-4), key
