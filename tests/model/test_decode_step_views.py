"""The batch-1 decode step's view and call-count shortcuts give the numbers of the code they replace, bit for bit.

- LocalizedFilter.forward_cached on one unpadded row: 2-D overlapping views, no unsqueezes (vs `_pairs` + cat).
- _cached_causal_attention at S = 1: q and k as strided views of the rotated qk (vs slicing), LFA and plain layouts.
- AttentionRouter.logits under no-grad: q, k, v as strided views of the projection (vs chunk + unsqueeze).
- LocalDispatcher.one_token: per-expert weight views made once, remade when a weight's storage changes.
- The topk router's inference aux loss: a kept zero (read-only), the computed loss under autograd.
- A batch-1 decode forward makes no nn.Module attribute misses (each costs an AttributeError, ~5k instructions).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_runtime.config import ModelConfig
from moe_runtime.model.attention import (
    CacheStep,
    LayerKVCache,
    LocalizedFilter,
    RotaryCache,
    _cached_causal_attention,
    _pairs,
    _rotate,
)
from moe_runtime.model.experts import SwiGLUExperts, swiglu
from moe_runtime.model.moe_layer import LocalDispatcher
from moe_runtime.model.router import AttentionRouter, LinearRouter
from moe_runtime.model.transformer import build_model


def _filter_reference(f: LocalizedFilter, x_bsd, inputs_b2d):
    """forward_cached's general path for rows that all have a past (the code before the 2-D shortcut)."""
    window = torch.cat((inputs_b2d, x_bsd), dim=1)
    w1 = f.conv1.weight.permute(0, 2, 1).reshape(f.conv1.weight.shape[0], -1)
    w2 = f.conv2.weight.permute(0, 2, 1).reshape(f.conv2.weight.shape[0], -1)
    y = F.linear(_pairs(window), w1, f.conv1.bias)
    z = F.linear(_pairs(y), w2, f.conv2.bias)
    return f.norm(z + x_bsd), window[:, -2:]


@pytest.mark.parametrize("s", [1, 4])
def test_one_row_filter_equals_the_general_path_bit_for_bit(s):
    torch.manual_seed(s)
    f = LocalizedFilter(16, init_std=0.3)
    nn.init.normal_(f.conv1.bias)
    nn.init.normal_(f.conv2.bias)
    step = CacheStep.build([7], [s], s, "cpu")
    assert step.has_past_b11 is None and step.lfa_tail_b2 is None  # the shortcut's case
    with torch.inference_mode():
        for _ in range(5):
            x, inputs = torch.randn(1, s, 16), torch.randn(1, 2, 16)
            u, tail = f.forward_cached(x, inputs, step)
            ref_u, ref_tail = _filter_reference(f, x, inputs)
            assert torch.equal(u, ref_u) and torch.equal(tail, ref_tail)
            assert u.shape == (1, s, 16) and tail.shape == (1, 2, 16)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("b", [1, 3])
def test_one_token_attention_q_k_views_equal_slicing_bit_for_bit(interleaved, b):
    torch.manual_seed(b)
    h, dh, r, cap = 2, 8, 4, 16
    rotary = RotaryCache(r, 10000.0, 32)
    start = [5] * b
    k0, v0 = torch.randn(b, h, cap, dh), torch.randn(b, h, cap, dh)
    fast_cache = LayerKVCache(k0.clone(), v0.clone(), None)
    ref_cache = LayerKVCache(k0.clone(), v0.clone(), None)
    qk, v = torch.randn(b, 2 * h, 1, dh), torch.randn(b, h, 1, dh)
    with torch.inference_mode():
        fast = _cached_causal_attention(qk, v, rotary, r, fast_cache, CacheStep.build(start, [1] * b, 1, "cpu"),
                                        interleaved)
        # reference: rotate-half on the table rows, slices, the cache append and SDPA
        step = CacheStep.build(start, [1] * b, 1, "cpu")
        cos, sin = rotary(6, qk.device)
        rot = _rotate(qk, cos[5:6], sin[5:6], r)
        q, k = (rot[:, 0::2], rot[:, 1::2]) if interleaved else (rot[:, :h], rot[:, h:])
        keys, values = ref_cache.append(k, v, step)
        ref = F.scaled_dot_product_attention(q, keys, values, scale=dh**-0.5).reshape(b, 1, h * dh)
    assert torch.equal(fast, ref)
    assert torch.equal(fast_cache.k_bhcd, ref_cache.k_bhcd) and torch.equal(fast_cache.v_bhcd, ref_cache.v_bhcd)


@pytest.mark.parametrize("t", [1, 5])
def test_attention_router_strided_views_equal_chunk_bit_for_bit(t):
    torch.manual_seed(t)
    router = AttentionRouter(16, 6, 2, init_std=0.5)
    x = torch.randn(t, 16)
    with torch.inference_mode():
        fast = router.logits(x)
        q, k, v = F.linear(x, router.wqkv).chunk(3, dim=-1)
        ref = torch.bmm(torch.softmax(q.unsqueeze(-1) * k.unsqueeze(-2), dim=-1), v.unsqueeze(-1)).squeeze(-1)
    assert torch.equal(fast, ref)
    torch.testing.assert_close(fast, router.logits(x).detach())  # the autograd einsum: equal to rounding


def test_one_token_expert_views_follow_weight_changes():
    torch.manual_seed(0)
    experts = SwiGLUExperts(4, 8, 12, init_std=0.3)
    disp = LocalDispatcher(experts)
    x = torch.randn(1, 8)
    gates = torch.tensor([[0.75, 0.25]])

    def ref() -> torch.Tensor:
        w1, w2 = experts.w1.detach(), experts.w2.detach()
        return swiglu(x, w1[1], w2[1]).mul_(gates[0, 1]).add_(swiglu(x, w1[3], w2[3]).mul_(gates[0, 0]))

    with torch.inference_mode():
        assert torch.equal(disp.one_token(x, [3, 1], gates), ref())
    with torch.no_grad():
        experts.w1.mul_(2.0)  # in place (an optimizer step, load_state_dict): the views see it
    with torch.inference_mode():
        assert torch.equal(disp.one_token(x, [3, 1], gates), ref())
    experts.w2.data = torch.randn_like(experts.w2)  # new storage (`.to()`): the views are remade
    with torch.inference_mode():
        assert torch.equal(disp.one_token(x, [3, 1], gates), ref())
    experts.w1 = nn.Parameter(torch.randn_like(experts.w1))  # a replaced Parameter
    with torch.inference_mode():
        assert torch.equal(disp.one_token(x, [3, 1], gates), ref())


@pytest.mark.parametrize("router_cls", [AttentionRouter, LinearRouter])
def test_inference_aux_loss_is_zero_and_autograd_keeps_computing_it(router_cls):
    router = router_cls(16, 6, 2, aux_loss_coeff=0.0)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        first, second = router(x).aux_loss, router(x).aux_loss
    assert first.dtype == torch.float32 and first.shape == () and float(first) == 0.0
    assert first is second  # kept, not made per call
    assert router(x).aux_loss is not first and float(router(x).aux_loss) == 0.0  # autograd: computed
    weighted = router_cls(16, 6, 2, aux_loss_coeff=0.5)
    with torch.inference_mode():
        assert float(weighted(x).aux_loss) > 0  # a coefficient: the real loss, also in inference


def test_batch_one_decode_step_makes_no_module_attribute_misses(monkeypatch):
    model = build_model(ModelConfig(preset="tiny"), 0).eval()
    cache = model.new_cache(1, 16)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache=cache, last_logits_only=True)
        model(torch.tensor([[4]]), cache=cache, last_logits_only=True)  # warm: weight views, rope tables
        misses: list[tuple[str, str]] = []
        real = nn.Module.__getattr__

        def counting(self, name):
            misses.append((type(self).__name__, name))
            return real(self, name)

        monkeypatch.setattr(nn.Module, "__getattr__", counting)
        model(torch.tensor([[5]]), cache=cache, last_logits_only=True)
    # nn.Embedding's own forward reads self.weight (torch's code); nothing of ours misses
    assert misses == [("Embedding", "weight")]
