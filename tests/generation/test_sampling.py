"""Sampling: the filters (temperature, top-k, top-p), greedy, and seeded draws."""

from __future__ import annotations

import math

import pytest
import torch

from moe_runtime.generation.sampling import SamplingParams, filter_logits, request_generator, sample_token


def test_greedy_is_argmax_and_uses_no_generator():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    p = SamplingParams(temperature=0)
    assert p.greedy and request_generator(SamplingParams(temperature=0, seed=3)) is None
    assert sample_token(logits, p, None) == 1


def test_temperature_scales_the_logits():
    logits = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(filter_logits(logits, 0.5, 0, 1.0), logits * 2)


def test_top_k_keeps_the_k_most_likely_and_top_k_1_is_greedy():
    logits = torch.tensor([0.5, 3.0, 1.0, 2.0, -4.0])
    kept = torch.isfinite(filter_logits(logits, 1.0, 2, 1.0))
    assert kept.tolist() == [False, True, False, True, False]
    assert torch.isfinite(filter_logits(logits, 1.0, 10, 1.0)).all()  # k >= V: no limit
    gen = torch.Generator().manual_seed(0)
    assert {sample_token(logits, SamplingParams(temperature=5.0, top_k=1), gen) for _ in range(20)} == {1}


def test_top_p_keeps_the_fewest_tokens_reaching_the_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, 1.0, 0, p)).tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.95) == [True, True, True, False]
    assert kept(0.96) == [True, True, True, True]
    assert kept(0.01) == [True, False, False, False]  # the most likely token always stays


def test_top_k_then_top_p_and_the_draw_follows_the_filtered_distribution():
    logits = torch.tensor([math.log(0.4), math.log(0.3), math.log(0.2), math.log(0.1)])
    params = SamplingParams(top_k=3, top_p=0.75)  # top-k leaves 0.4/0.3/0.2 -> renormalised .44/.33/.22 -> 2 kept
    gen = request_generator(SamplingParams(seed=0, top_k=3))
    draws = [sample_token(logits, params, gen) for _ in range(4000)]
    assert set(draws) == {0, 1}
    assert abs(draws.count(0) / len(draws) - 4 / 7) < 0.03


def test_same_seed_same_tokens():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(seed=7, temperature=1.3)

    def draws(params):
        gen = request_generator(params)
        return [sample_token(logits, params, gen) for _ in range(30)]

    assert draws(p) == draws(p)
    assert draws(p) != draws(SamplingParams(seed=8, temperature=1.3))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_new_tokens=0), "max_new_tokens = 0"),
        (dict(temperature=-1), "temperature = -1"),
        (dict(temperature=float("nan")), "temperature = nan"),
        (dict(top_k=-1), "top_k = -1"),
        (dict(top_p=0), "top_p = 0"),
        (dict(top_p=1.5), "top_p = 1.5"),
        (dict(seed=-2), "seed = -2"),
        (dict(stop=("",)), "non-empty"),
    ],
)
def test_bad_params_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_stop_accepts_one_string_or_a_list():
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[5]).stop == ("a", "b")
