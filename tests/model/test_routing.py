"""Routing rules (model/routing.py) through both routers, the plan with variable copies, the config's checks."""

from __future__ import annotations

import math
import re

import pytest
import torch

from moe_runtime.config import ConfigError, ModelConfig, parse_config
from moe_runtime.model.experts import SwiGLUExperts
from moe_runtime.model.moe_layer import LocalDispatcher, MoELayer
from moe_runtime.model.plan import DispatchPlan
from moe_runtime.model.router import AttentionRouter, LinearRouter, build_router
from moe_runtime.model.routing import RoutingSpec, entropy_loss, expert_nodes, static_actor_nodes
from moe_runtime.model.transformer import build_model
from moe_runtime.placement import Placement

ROUTERS = [AttentionRouter, LinearRouter]
E, D, T = 8, 16, 64


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def _router(cls, spec: RoutingSpec, seed: int = 0):
    torch.manual_seed(seed)
    return cls(D, E, spec.top_k, 0.0, 0.5, spec)  # a large init std: peaked, varied routing


@pytest.mark.parametrize("cls", ROUTERS)
def test_topk_spec_is_the_original_router_bit_for_bit(cls):
    torch.manual_seed(3)
    plain = cls(D, E, 2, 0.01, 0.5)
    torch.manual_seed(3)
    spec = cls(D, E, 2, 0.01, 0.5, RoutingSpec("topk", 2))
    x = _x()
    a, b = plain(x), spec(x)
    assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.weights, b.weights)
    assert torch.equal(a.aux_loss, b.aux_loss) and a.mask is None and b.mask is None


@pytest.mark.parametrize("cls", ROUTERS)
def test_grouped_takes_k_over_g_per_group_with_global_softmax_gates(cls):
    router = _router(cls, RoutingSpec("grouped", 4, groups=2))
    x = _x()
    out = router(x)
    probs = torch.softmax(router.logits(x), -1)
    group = out.expert_ids // (E // 2)
    assert ((group == 0).sum(-1) == 2).all() and ((group == 1).sum(-1) == 2).all()
    for t in range(T):  # the best two of each group, gates = their global softmax scores (not renormalised)
        for g in range(2):
            want = set(torch.topk(probs[t, g * 4:(g + 1) * 4], 2).indices.add(g * 4).tolist())
            assert set(out.expert_ids[t][group[t] == g].tolist()) == want
    torch.testing.assert_close(out.weights, probs.gather(-1, out.expert_ids))
    assert (out.weights[:, :-1] >= out.weights[:, 1:]).all()  # descending gate order
    plan = DispatchPlan.build(out.expert_ids, Placement.contiguous(1, E, 2), 0)
    assert plan.actor_rows(2) == [T * 2, T * 2]  # each group (= actor group) gets exactly T*k/G copies


@pytest.mark.parametrize("cls", ROUTERS)
@pytest.mark.parametrize("p, k_max", [(0.5, 8), (0.8, 3), (1.0, None)])
def test_top_p_takes_the_smallest_set_reaching_p(cls, p, k_max):
    router = _router(cls, RoutingSpec("top_p", 2, top_p=p, k_max=k_max))
    x = _x()
    out = router(x)
    probs = torch.softmax(router.logits(x), -1).detach()
    slots = k_max or E
    assert out.expert_ids.shape == (T, slots) and out.mask.shape == (T, slots)
    for t in range(T):
        sorted_p, idx = torch.sort(probs[t], descending=True)
        n = int(out.mask[t].sum())
        assert out.mask[t, :n].all()  # the real slots come first
        assert 1 <= n <= slots
        # minimal: the first n reach p (or n is the cap), the first n - 1 do not
        assert n == slots or float(sorted_p[:n].sum()) >= p - 1e-5
        assert n == 1 or float(sorted_p[:n - 1].sum()) < p + 1e-6
        chosen = out.expert_ids[t][out.mask[t]]
        torch.testing.assert_close(probs[t][chosen], sorted_p[:n])  # the n most likely (ties in any order)
    torch.testing.assert_close(out.weights, probs.gather(-1, out.expert_ids) * out.mask)
    assert 1.0 <= out.experts_per_token() <= slots


@pytest.mark.parametrize("cls", ROUTERS)
def test_node_limited_keeps_each_token_on_at_most_m_nodes(cls):
    nodes = [0, 0, 1, 1, 2, 2, 3, 3]
    router = _router(cls, RoutingSpec("node_limited", 4, max_nodes=2))
    with pytest.raises(RuntimeError, match="set_expert_nodes"):
        router(_x())
    router.set_expert_nodes(nodes)
    x = _x()
    out = router(x)
    probs = torch.softmax(router.logits(x), -1)
    node_of = torch.tensor(nodes)
    for t in range(T):  # nodes by the sum of their top-ceil(4/2) = 2 probabilities, then top-4 inside them
        score = [probs[t][node_of == n].topk(2).values.sum() for n in range(4)]
        best = set(torch.topk(torch.stack(score), 2).indices.tolist())
        assert set(node_of[out.expert_ids[t]].tolist()) <= best
        allowed = torch.tensor([n in best for n in nodes])
        want = torch.topk(probs[t].masked_fill(~allowed, -1), 4).indices
        assert out.expert_ids[t].tolist() == want.tolist()
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(T))  # normalised over the chosen k


@pytest.mark.parametrize("cls", ROUTERS)
def test_node_limited_with_m_at_least_nodes_is_topk(cls):
    a = _router(cls, RoutingSpec("topk", 2), seed=1)
    b = _router(cls, RoutingSpec("node_limited", 2, max_nodes=2), seed=1)
    b.set_expert_nodes([0, 0, 0, 0, 1, 1, 1, 1])
    x = _x()
    assert torch.equal(a(x).expert_ids, b(x).expert_ids) and torch.equal(a(x).weights, b(x).weights)


def test_set_expert_nodes_rejects_maps_that_cannot_hold_k():
    router = _router(LinearRouter, RoutingSpec("node_limited", 4, max_nodes=1))
    with pytest.raises(ValueError, match=r"max_nodes = 1: the 1 smallest nodes hold 2 experts, fewer than top_k = 4"):
        router.set_expert_nodes([0, 0, 1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="expert_nodes has 3 entries: expected num_experts"):
        router.set_expert_nodes([0, 0, 1])


def test_expert_nodes_follow_the_primary_replica():
    placement = Placement.contiguous(2, 8, 4, actor_nodes=static_actor_nodes(4, 2))
    assert static_actor_nodes(4, 2) == (0, 0, 1, 1)
    assert expert_nodes(placement, 1) == (0, 0, 0, 0, 1, 1, 1, 1)


def test_entropy_loss_is_the_mean_routing_entropy_and_trains_the_router():
    router = _router(LinearRouter, RoutingSpec("top_p", 2, top_p=0.6, dynamic_loss_coeff=0.1))
    out = router(_x())
    p = out.probs
    want = 0.1 * (-(p * p.log()).sum(-1).mean())
    torch.testing.assert_close(out.aux_loss, want)
    torch.testing.assert_close(entropy_loss(torch.full((3, 4), 0.25), 1.0), torch.tensor(math.log(4)))
    out.aux_loss.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_masked_aux_loss_counts_real_copies_only():
    router = _router(LinearRouter, RoutingSpec("top_p", 2, top_p=0.5))
    router.aux_loss_coeff = 1.0
    out = router(_x())
    chosen = torch.zeros(T, E)
    for t in range(T):
        chosen[t, out.expert_ids[t][out.mask[t]]] = 1.0
    want = E * (out.probs.mean(0) * chosen.sum(0) / out.mask.sum()).sum()
    torch.testing.assert_close(out.aux_loss, want)


# ------------------------------------------------------------------------------------------ plan with a mask


def test_plan_with_full_mask_is_the_plan_without_one():
    ids = torch.randint(0, E, (T, 2), generator=torch.Generator().manual_seed(0))
    placement = Placement(4, (tuple((e % 4,) if e % 3 else (e % 4, (e + 1) % 4) for e in range(E)),))
    a = DispatchPlan.build(ids, placement, 0)
    b = DispatchPlan.build(ids, placement, 0, torch.ones(T, 2, dtype=torch.bool))
    assert torch.equal(a.order, b.order) and a.segments == b.segments and a.num_copies == b.num_copies == 2 * T
    assert torch.equal(a.expert_counts, b.expert_counts)


def test_plan_with_mask_sends_only_real_slots_and_combines_them():
    ids = torch.tensor([[1, 3, 3], [0, 0, 0], [2, 0, 1]])
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    w = torch.tensor([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0], [0.5, 0.3, 0.2]])
    plan = DispatchPlan.build(ids, Placement.contiguous(1, 4, 2), 0, mask)
    assert plan.num_copies == 6 and plan.expert_counts.tolist() == [2, 2, 1, 1]
    assert sorted(plan.order.tolist()) == [0, 1, 3, 6, 7, 8]
    x = torch.randn(3, 5)
    y = plan.gather(x) * 2.0  # an expert that doubles
    torch.testing.assert_close(plan.combine(y, w), 2.0 * x)
    with pytest.raises(ValueError, match=r"mask has shape \[3, 2\]: expected expert_ids' \[3, 3\]"):
        DispatchPlan.build(ids, Placement.contiguous(1, 4, 2), 0, mask[:, :2])


def test_moe_layer_with_top_p_equals_a_per_token_loop():
    torch.manual_seed(0)
    experts = SwiGLUExperts(E, D, 24, 0.3)
    router = build_router("attention", D, E, 2, 0.0, 0.5, RoutingSpec("top_p", 2, top_p=0.7, k_max=4))
    layer = MoELayer(router, LocalDispatcher(experts), 0)
    x = _x().requires_grad_()
    y, _ = layer(x.unsqueeze(0))
    routed = layer.last_router_output
    want = torch.zeros(T, D)
    for t in range(T):
        for s in range(4):
            if routed.mask[t, s]:
                e = int(routed.expert_ids[t, s])
                want[t] += routed.weights[t, s] * experts(x[t:t + 1], [1], [e])[0]
    torch.testing.assert_close(y[0], want, rtol=1e-5, atol=1e-6)
    assert layer.last_plan.expert_counts.sum() == routed.mask.sum()
    y.sum().backward()
    assert router.wqkv.grad.abs().sum() > 0  # the router learns through the gates


def test_model_runs_every_routing_and_reports_copies():
    for extra in ({"routing": "grouped", "routing_groups": 2}, {"routing": "top_p", "top_p": 0.5, "k_max": 4},
                  {"routing": "node_limited", "max_nodes": 1}):
        cfg = ModelConfig(preset="tiny", **extra)
        model = build_model(cfg, seed=0)
        model.set_expert_nodes(Placement.contiguous(2, 8, 4, static_actor_nodes(4, 2)))
        tokens = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
        loss, ce = model.loss(tokens[:, :-1], tokens[:, 1:])
        assert torch.isfinite(loss)
        load = model.expert_load()
        if extra["routing"] == "top_p":
            assert (30 <= load.sum(-1)).all() and (load.sum(-1) <= 30 * 4).all()
        else:
            assert (load.sum(-1) == 30 * 2).all()
        if extra["routing"] == "node_limited":  # one node per token: experts 0-3 or 4-7 only
            for m in model.moe_layers:
                halves = m.last_router_output.expert_ids // 4
                assert (halves[:, 0] == halves[:, 1]).all()


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("extra, message", [
    ({"routing": "grouped", "routing_groups": 3}, "model.routing_groups = 3: must be >= 1 and divide num_experts (8)"),
    ({"routing": "grouped", "routing_groups": 4}, "model.routing_groups = 4: must be >= 1 and divide num_experts (8) "
                                                  "and top_k (2)"),
    ({"routing": "top_p", "top_p": 0.0}, "model.top_p = 0.0: must be in (0, 1]"),
    ({"routing": "top_p", "top_p": 1.5}, "model.top_p = 1.5: must be in (0, 1]"),
    ({"routing": "top_p", "k_max": 9}, "model.k_max = 9: must be in [1, num_experts = 8]"),
    ({"routing": "top_p", "dynamic_loss_coeff": -1.0}, "model.dynamic_loss_coeff = -1.0: must be >= 0"),
    ({"routing": "node_limited", "max_nodes": 0}, "model.max_nodes = 0: must be >= 1"),
    ({"top_p": 0.5}, "model.top_p = 0.5: only used by routing = 'top_p' (routing is 'topk')"),
    ({"routing": "grouped", "max_nodes": 2}, "model.max_nodes = 2: only used by routing = 'node_limited'"),
    ({"routing": "sparse"}, "model.routing = 'sparse'"),
])
def test_config_rejects_bad_routing_with_field_value_and_expectation(extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"model": {"preset": "tiny", **extra}})


def test_config_grouped_needs_groups_to_divide_the_actors():
    with pytest.raises(ConfigError, match=r"model.routing_groups = 2: must divide cluster.expert_actors \(3\)"):
        parse_config({"model": {"preset": "tiny", "routing": "grouped", "routing_groups": 2},
                      "cluster": {"expert_actors": 3}})
    cfg = parse_config({"model": {"preset": "tiny", "routing": "top_p", "top_p": 0.6, "k_max": 4}})
    assert cfg.model.max_copies_per_token == 4 and ModelConfig(preset="tiny").max_copies_per_token == 2
