"""MoELayer with the LocalDispatcher against a per-token dense reference: outputs and all gradients."""

import pytest
import torch
from torch.testing import assert_close

from moe_runtime.model.moe_layer import LocalDispatcher
from moe_runtime.model.experts import SwiGLUExperts, grouped_swiglu
from moe_runtime.model.moe_layer import MoELayer
from moe_runtime.model.router import AttentionRouter, LinearRouter
from moe_runtime.placement import Placement


def dense_reference(x_td, router, w1, w2):
    """For every token, run every chosen expert on it alone and sum with the gates: no sorting, no plan."""
    out = router(x_td)
    rows = []
    for t in range(x_td.shape[0]):
        acc = torch.zeros_like(x_td[t])
        for slot in range(out.expert_ids.shape[1]):
            e = int(out.expert_ids[t, slot])
            a, g = (x_td[t] @ w1[e]).chunk(2)
            acc = acc + out.weights[t, slot] * ((torch.nn.functional.silu(a) * g) @ w2[e])
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("router_cls", [AttentionRouter, LinearRouter])
@pytest.mark.parametrize("replicated", [False, True])
def test_moe_layer_matches_dense_reference(router_cls, replicated):
    torch.manual_seed(0)
    d, ffn, num_experts, k = 16, 32, 6, 2
    router = router_cls(d, num_experts, k, init_std=0.3)
    experts = SwiGLUExperts(num_experts, d, ffn, init_std=0.2)
    placement = None
    if replicated:  # two "actors", experts 0 and 3 on both: the plan splits their tokens, the math must not change
        placement = Placement(2, (((0, 1), (0,), (0,), (1, 0), (1,), (1,)),))
    layer = MoELayer(router, LocalDispatcher(experts, placement), layer_index=0)
    x = torch.randn(2, 13, d, requires_grad=True)
    y, _ = layer(x)

    x_ref = x.detach().clone().requires_grad_(True)
    router_ref = router_cls(d, num_experts, k, init_std=0.3)
    router_ref.load_state_dict(router.state_dict())
    w1 = experts.w1.detach().clone().requires_grad_(True)
    w2 = experts.w2.detach().clone().requires_grad_(True)
    y_ref = dense_reference(x_ref.reshape(-1, d), router_ref, w1, w2).view_as(x)
    assert_close(y, y_ref)

    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert_close(x.grad, x_ref.grad)
    assert_close(experts.w1.grad, w1.grad)
    assert_close(experts.w2.grad, w2.grad)
    for p, p_ref in zip(router.parameters(), router_ref.parameters()):
        assert p.grad.abs().sum() > 0
        assert_close(p.grad, p_ref.grad)
    assert layer.last_plan.expert_counts.sum() == 26 * k


def test_grouped_swiglu_rejects_count_mismatch():
    w1, w2 = torch.randn(2, 4, 8), torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match="counts sum to 3: expected x rows \\(4\\)"):
        grouped_swiglu(torch.randn(4, 4), [1, 2], w1, w2)


@pytest.mark.parametrize("seed", range(6))
def test_local_dispatcher_batch1_decode_path_equals_grouped_swiglu(seed):
    """Inference with a couple of copies runs segment by segment: bit for bit grouped_swiglu's loop path (its
    padded path, which it would pick here, up to fp32 rounding)."""
    from moe_runtime.model.experts import grouped_swiglu_loop
    from moe_runtime.model.plan import DispatchPlan

    torch.manual_seed(seed)
    experts = SwiGLUExperts(8, 16, 24)
    dispatcher = LocalDispatcher(experts, num_layers=1)
    ids = torch.randperm(8)[:2].view(1, 2)
    plan = DispatchPlan.build(ids, dispatcher.placement, 0)
    x = torch.randn(2, 16)
    with torch.no_grad():
        fast = dispatcher(x, plan)
        args = (x, [s.count for s in plan.segments], experts.w1, experts.w2, [s.expert for s in plan.segments])
        loop, grouped = grouped_swiglu_loop(*args), grouped_swiglu(*args)
    assert torch.equal(fast, loop)
    assert_close(fast, grouped)
