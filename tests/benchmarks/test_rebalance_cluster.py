"""benchmarks/rebalance_cluster.py's summaries of the interleaved phases: the step and expert-phase gains with
their spread, the note, and the second destination's cost per step. Pure functions on recorded phases; the
cluster run itself is `benchmarks/rebalance_cluster.py --quick` (make bench)."""

from __future__ import annotations

import pytest

from benchmarks import rebalance_cluster as rc


def _phase(step_s, expert_s, dispatch_s, tokens):
    return {"step_s": step_s, "expert_s": expert_s, "dispatch_s": dispatch_s, "actor_tokens": tokens}


def _phases(rounds: int = 7):
    static = [_phase([0.32, 0.33, 0.31], [0.19, 0.20, 0.19], [0.010, 0.011, 0.010], [4096, 0])] * rounds
    rebalanced = [_phase([0.30, 0.31, 0.30], [0.14, 0.15, 0.14], [0.012, 0.013, 0.012], [2048, 2048])] * rounds
    return {"static": static, "rebalanced": rebalanced}


def test_gain_spreads_pair_phase_medians_by_round():
    g = rc.gain_spreads(_phases())
    assert g["step_gain"]["median"] == pytest.approx(0.32 / 0.30)
    assert g["expert_phase_gain"]["median"] == pytest.approx(0.19 / 0.14)
    assert g["step_gain"]["rounds"] == 7 and g["expert_phase_gain"]["within_noise"] is False
    assert g["expert_s_static_median"] == pytest.approx(0.19)
    assert rc.gain_spreads({"static": [], "rebalanced": []})["step_gain"] is None


def test_gain_note_says_within_noise():
    few = rc.gain_spreads(_phases(rounds=3))  # 3 rounds: a sign test cannot call it
    note = rc.gain_note(few["step_gain"], few["expert_phase_gain"])
    assert note.count("within noise") == 2 and "over 3 rounds" in note
    many = rc.gain_spreads(_phases())
    assert "a gain" in rc.gain_note(many["step_gain"], many["expert_phase_gain"])
    assert rc.gain_note(None, None) is None


def test_extra_destination_cost_counts_the_exchanges_that_gained_one():
    cfg = rc._cluster_config(128, 2048, 8, 128, 0)
    probe = {"cost_s": 0.0005}
    out = rc.extra_destination_cost(_phases(), cfg, probe)
    exchanges = 2 * cfg.model.num_layers  # 1 router worker, 1 micro-batch, forward + backward
    assert out["exchanges_per_step"] == exchanges and out["destinations_gained_per_exchange"] == 1
    assert out["cost_per_step_s"] == pytest.approx(0.0005 * exchanges)
    assert out["cost_from_steps_s"] == pytest.approx((0.012 - 0.010) / exchanges)
    assert rc.destinations_per_exchange([5, 0, 3]) == 2
