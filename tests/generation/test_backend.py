"""The cached backend returns the full-recompute backend's logits, prefill and decode, across keep/join."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from moe_runtime.config import ModelConfig
from moe_runtime.generation.backend import LocalBackend, RecomputeBackend, pad_right
from moe_runtime.model.transformer import build_model


def test_pad_right():
    tokens, lengths = pad_right([[1, 2, 3], [4]], pad_id=9)
    assert tokens.tolist() == [[1, 2, 3], [4, 9, 9]] and lengths.tolist() == [3, 1]


@pytest.mark.parametrize("lfa", [True, False])
def test_cached_backend_matches_recompute_through_keep_and_join(lfa):
    model = build_model(ModelConfig(preset="tiny", lfa=lfa), seed=0).eval()
    cached, full = LocalBackend(model), RecomputeBackend(model)
    prompts = [[1, 2, 3, 4], [5], [6, 7]]
    c_cache, c_logits = cached.prefill(prompts, capacity=8)
    f_cache, f_logits = full.prefill(prompts, capacity=8)
    assert c_logits.dtype == torch.float32 and c_logits.device.type == "cpu"
    assert_close(c_logits, f_logits)
    for tokens in ([10, 11, 12], [13, 14, 15]):
        assert_close(cached.decode(c_cache, tokens), full.decode(f_cache, tokens))
    c_cache, f_cache = cached.keep(c_cache, [2, 0]), full.keep(f_cache, [2, 0])
    c_new, c_logits = cached.prefill([[20, 21, 22]], capacity=4)
    f_new, f_logits = full.prefill([[20, 21, 22]], capacity=4)
    assert_close(c_logits, f_logits)
    c_cache, f_cache = cached.join(c_cache, c_new), full.join(f_cache, f_new)
    for tokens in ([30, 31, 32], [33, 34, 35]):
        assert_close(cached.decode(c_cache, tokens), full.decode(f_cache, tokens))
    assert cached.keep(c_cache, []) is None and full.keep(f_cache, []) is None
