"""benchmarks/router_experiment.py's pure parts: every variant is a valid config, and the seed-spread verdict."""

from __future__ import annotations

import math

import pytest

from benchmarks.router_experiment import VARIANTS, compare, summarise, variant_config


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_are_valid_configs_on_the_local_layout(name):
    cfg = variant_config(VARIANTS[name], seed=2, steps=7, max_files=10)
    assert cfg.train.seed == 2 and cfg.train.steps == 7 and not cfg.scheduler.enabled
    assert cfg.model.preset == "tiny" and cfg.model.router == VARIANTS[name]["router"]
    assert cfg.cluster.expert_actors == 4 and cfg.cluster.router_workers == 2


def _runs(vals):
    return [{"val_loss": v, "tokens_per_s": 1.0, "actor_load_max_over_mean": 1.0,
             "group_load_max_over_mean": 1.0, "experts_per_token": 2.0,
             "final_train_loss": v, "params": 1, "training_flops_per_token": 1} for v in vals]


def test_verdict_compares_the_mean_difference_with_the_seed_spread():
    a, b = summarise(_runs([2.0, 2.2, 2.1])), summarise(_runs([2.5, 2.4, 2.6]))
    assert a["val_loss_mean"] == pytest.approx(2.1) and a["val_loss_std"] == pytest.approx(0.1)
    v = compare(a, b, 3, 3)
    assert v["diff"] == pytest.approx(-0.4) and v["two_se"] == pytest.approx(2 * math.sqrt(0.02 / 3))
    assert v["exceeds_seed_std"] and v["exceeds_two_se"]
    close = compare(summarise(_runs([2.0, 2.2, 2.1])), summarise(_runs([2.05, 2.25, 2.15])), 3, 3)
    assert not close["exceeds_seed_std"] and not close["exceeds_two_se"]
