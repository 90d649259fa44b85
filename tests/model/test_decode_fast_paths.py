"""The one-token decode fast paths give the numbers of the general paths they replace, bit for bit.

- MoELayer on one token in process (LocalDispatcher.one_token): no DispatchPlan, gather or index_add; the plan is
  built only when `last_plan` is read (load statistics).
- Rope of a one-token step as x * C + x @ M (attention._step_rope_matrices) against rotate-half (`_rotate`).
- The LFA filter's kernel-2 convs on one row through an overlapping view (`_pairs_linear`) against the cat.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from moe_runtime.model.attention import (
    CacheStep,
    RotaryCache,
    _pairs,
    _pairs_linear,
    _rotate,
    _step_rope_matrices,
)
from moe_runtime.model.experts import SwiGLUExperts, swiglu
from moe_runtime.model.moe_layer import LocalDispatcher, MoELayer
from moe_runtime.model.plan import DispatchPlan
from moe_runtime.model.router import AttentionRouter, LinearRouter
from moe_runtime.placement import Placement


def moe_layer(router_cls, k: int, placement: Placement | None = None) -> MoELayer:
    torch.manual_seed(3)
    d, ffn, num_experts = 16, 24, 6
    router = router_cls(d, num_experts, k, init_std=0.3)
    return MoELayer(router, LocalDispatcher(SwiGLUExperts(num_experts, d, ffn, init_std=0.2), placement), 0)


def plan_path(layer: MoELayer, x_td: torch.Tensor) -> tuple[torch.Tensor, DispatchPlan]:
    """What MoELayer.forward did before the fast path: plan, gather, one SwiGLU per copy, combine."""
    routed = layer.router(x_td)
    plan = DispatchPlan.build(routed.expert_ids, layer.dispatcher.placement, layer.layer_index)
    x_nd = plan.gather(x_td)
    w1, w2 = layer.dispatcher.experts.w1, layer.dispatcher.experts.w2
    y_nd = torch.cat([swiglu(x_nd[s.start : s.start + s.count], w1[s.expert], w2[s.expert]) for s in plan.segments])
    return plan.combine(y_nd, routed.weights), plan


@pytest.mark.parametrize("router_cls", [AttentionRouter, LinearRouter])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("replicated", [False, True])
def test_one_token_moe_equals_the_plan_path_bit_for_bit(router_cls, k, replicated):
    placement = Placement(2, (((0, 1), (0,), (0,), (1, 0), (1,), (1,)),)) if replicated else None
    layer = moe_layer(router_cls, k, placement)
    for seed in range(5):
        x = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            fast, _ = layer(x)
            ref, plan = plan_path(layer, x.view(1, 16))
            assert torch.equal(fast.view(1, 16), ref)
            # the dispatcher's own path (grouped experts beyond 2 copies) agrees to rounding
            routed = layer.last_router_output
            general = plan.combine(layer.dispatcher(plan.gather(x.view(1, 16)), plan), routed.weights)
            assert_close(fast.view(1, 16), general)
            lazy = layer.last_plan  # built now, from the forward's routing
            assert torch.equal(lazy.order, plan.order) and torch.equal(lazy.expert_counts, plan.expert_counts)
            assert [(s.actor, s.expert, s.start, s.count) for s in lazy.segments] == [
                (s.actor, s.expert, s.start, s.count) for s in plan.segments]
            assert layer.last_plan is lazy  # built once


def test_one_token_with_autograd_takes_the_plan_path_and_has_gradients():
    layer = moe_layer(AttentionRouter, 2)
    x = torch.randn(1, 1, 16, requires_grad=True)
    y, _ = layer(x)
    y.sum().backward()
    assert x.grad is not None and layer.dispatcher.experts.w1.grad is not None
    assert layer.last_plan.num_copies == 2
    with torch.no_grad():  # autograd's grouped experts vs one SwiGLU per copy: equal to rounding
        assert_close(layer(x)[0], y.detach())


def test_last_plan_can_be_set_and_a_many_token_forward_replaces_a_pending_plan():
    layer = moe_layer(AttentionRouter, 2)
    with torch.inference_mode():
        layer(torch.randn(1, 1, 16))
        layer(torch.randn(2, 3, 16))  # the plan path: its own plan, no pending one
        assert layer.last_plan.num_tokens == 6
        layer(torch.randn(1, 1, 16))
    layer.last_plan = None  # model/two_batch.py assigns plans from outside
    assert layer.last_plan is None


@pytest.mark.parametrize("rotary_dim, head_dim", [(16, 32), (32, 32), (8, 16)])
@pytest.mark.parametrize("mode", ["exact", "hf"])
def test_rope_matrices_equal_rotate_half_bit_for_bit(rotary_dim, head_dim, mode):
    rotary = RotaryCache(rotary_dim, 10000.0, 64, mode)
    g = torch.Generator().manual_seed(rotary_dim)
    for start in ([5], [0, 7, 40], [63, 63]):
        b = len(start)
        step = CacheStep.build(start, [1] * b, 1, "cpu")
        qk = torch.randn(b, 4, 1, head_dim, generator=g) * 3
        cos_b11d, rot = _step_rope_matrices(rotary, step, head_dim, qk.device)
        fast = qk * cos_b11d + qk @ rot
        cos, sin = rotary(64, qk.device)
        pos = torch.tensor(start)
        ref = _rotate(qk, cos[pos][:, None, None], sin[pos][:, None, None], rotary_dim)
        assert torch.equal(fast, ref), start


def test_rope_tables_follow_a_longer_table():
    rotary = RotaryCache(16, 10000.0, 8)
    step = CacheStep.build([20], [1], 1, "cpu")  # past the built table: rebuilt to 21 rows
    qk = torch.randn(1, 2, 1, 32)
    cos_b11d, rot = _step_rope_matrices(rotary, step, 32, qk.device)
    cos, sin = rotary(21, qk.device)
    assert torch.equal(qk * cos_b11d + qk @ rot, _rotate(qk, cos[20:21], sin[20:21], 16))


@pytest.mark.parametrize("b, s", [(1, 3), (1, 11), (3, 3)])
def test_pairs_linear_equals_the_cat_bit_for_bit(b, s):
    torch.manual_seed(s)
    x = torch.randn(b, s, 8)
    w, bias = torch.randn(5, 16), torch.randn(5)
    assert torch.equal(_pairs_linear(x, w, bias), F.linear(_pairs(x), w, bias))
