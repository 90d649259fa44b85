"""The per-step record's pure parts: per-actor imbalance and the terminal line."""

from moe_runtime.runtime.step_log import format_line, imbalance


def test_imbalance_is_max_over_mean():
    assert imbalance([30, 10]) == 1.5
    assert imbalance([5, 5, 5]) == 1.0
    assert imbalance([0, 0]) is None and imbalance([]) is None


def test_format_line_names_every_number_and_rebalances():
    rec = {"step": 12, "loss": 3.45678, "lr": 3e-4, "grad_norm": 1.2345, "step_s": 0.84, "imbalance": 1.123,
           "last_decision": "v1->v2 changed"}
    line = format_line(rec, rebalanced=True)
    assert line == ("step    12  loss 3.4568  lr 3.00e-04  grad 1.234  0.84 s  imbalance 1.123  "
                    "REBALANCED (v1->v2 changed)")
    assert "grad" not in format_line({**rec, "grad_norm": None, "imbalance": None}, rebalanced=False)
