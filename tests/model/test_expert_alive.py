"""Masked experts (router.set_expert_alive, routing.check_expert_alive): every routing rule with dead experts equals
the same rule run over the live experts only, ids mapped back; gates renormalised where the rule normalises; a
mask that leaves a rule too few experts is refused naming what is missing; the config accepts fail | mask only."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.config import ConfigError, parse_config
from moe_runtime.dispatch.failover import lost_experts
from moe_runtime.model.router import AttentionRouter, LinearRouter
from moe_runtime.model.routing import (
    RoutingSpec,
    select_grouped,
    select_node_limited,
    select_top_p,
    top_k_gates,
)
from moe_runtime.model.transformer import build_model
from moe_runtime.placement import Placement

ROUTERS = [AttentionRouter, LinearRouter]
E, D, T = 8, 16, 96
DEAD = [1, 4, 6]
NODES = (0, 0, 1, 1, 2, 2, 3, 3)


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def _router(cls, spec: RoutingSpec, seed: int = 0):
    torch.manual_seed(seed)
    r = cls(D, E, spec.top_k, 0.0, 0.5, spec)  # a large init std: peaked, varied routing
    if spec.kind == "node_limited":
        r.set_expert_nodes(NODES)
    return r


def _dense(ids_tk: torch.Tensor, gates_tk: torch.Tensor, mask_tk: torch.Tensor | None = None) -> torch.Tensor:
    """[T, E] gate per (token, expert): order-free comparison of two selections."""
    g = gates_tk.float() if mask_tk is None else gates_tk.float() * mask_tk
    return torch.zeros(ids_tk.shape[0], E).scatter_add_(-1, ids_tk, g)


def _alive(dead=DEAD) -> list[bool]:
    return [e not in dead for e in range(E)]


def _reference(r, x: torch.Tensor, dead=DEAD):
    """The rule on the live experts' logits only (a [T, E_live] problem), ids mapped back to the full range."""
    live = torch.tensor([e for e in range(E) if e not in dead])
    logits = r.logits(x)[:, live]
    probs = torch.softmax(logits, dim=-1)
    s = r.routing
    if s.kind == "topk":
        ids, gates = top_k_gates(logits, s.top_k)
        return live[ids], gates, None
    if s.kind == "top_p":
        sel = select_top_p(probs, s.top_p, min(s.slots(E), len(live)))
        return live[sel.expert_ids], sel.gates, sel.mask
    if s.kind == "node_limited":
        sel = select_node_limited(logits, probs, s.top_k, s.max_nodes, torch.tensor(NODES)[live])
        return live[sel.expert_ids], sel.gates, None
    # grouped: each group's top-k/G among its live experts, by the probabilities over the live experts
    full = torch.zeros(T, E).index_copy_(1, live, probs)
    full[:, dead] = -1.0  # never picked: every group keeps >= k/G live experts here
    sel = select_grouped(full, s.top_k, s.groups)
    return sel.expert_ids, sel.gates, None


SPECS = [
    RoutingSpec("topk", 2),
    RoutingSpec("topk", 4),
    RoutingSpec("grouped", 2, groups=2),
    RoutingSpec("top_p", 2, top_p=0.7, k_max=4),
    RoutingSpec("top_p", 2, top_p=1.0, k_max=8),  # k_max over the live count: dead slots are never real
    RoutingSpec("node_limited", 2, max_nodes=2),
]


@pytest.mark.parametrize("cls", ROUTERS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-k{s.top_k}-p{s.top_p}")
def test_masked_routing_is_the_rule_over_the_live_experts(cls, spec):
    r = _router(cls, spec)
    x = _x()
    r.set_expert_alive(_alive())
    assert r.masked_experts() == DEAD
    out = r(x)
    ids, gates, mask = _reference(r, x)
    real = out.expert_ids if out.mask is None else out.expert_ids[out.mask]
    assert not torch.isin(real, torch.tensor(DEAD)).any()
    torch.testing.assert_close(_dense(out.expert_ids, out.weights, out.mask), _dense(ids, gates, mask))
    if out.mask is not None:
        assert torch.equal(out.mask.sum(-1), mask.sum(-1))
    w = out.weights if out.mask is None else out.weights * out.mask
    assert (w[:, :-1] >= w[:, 1:] - 1e-7).all()  # descending gate order within a token
    if spec.kind in ("topk", "node_limited"):  # renormalised over the chosen live experts
        torch.testing.assert_close(out.weights.sum(-1), torch.ones(T))
    assert (out.probs[:, DEAD] == 0).all()  # the softmax over the live experts only
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(T))


@pytest.mark.parametrize("cls", ROUTERS)
def test_masking_changes_routing_only_for_tokens_that_chose_a_dead_expert(cls):
    r = _router(cls, RoutingSpec("topk", 2))
    x = _x(1)
    before = r(x)
    r.set_expert_alive(_alive())
    after = r(x)
    hit = torch.isin(before.expert_ids, torch.tensor(DEAD)).any(-1)
    assert hit.any() and (~hit).any()
    assert torch.equal(before.expert_ids[~hit], after.expert_ids[~hit])
    torch.testing.assert_close(before.weights[~hit], after.weights[~hit])
    assert not torch.equal(before.expert_ids[hit], after.expert_ids[hit])


@pytest.mark.parametrize("cls", ROUTERS)
def test_clearing_the_mask_is_the_original_router_bit_for_bit(cls):
    r = _router(cls, RoutingSpec("topk", 2))
    x = _x(2)
    plain = r(x)
    r.set_expert_alive(_alive())
    r.set_expert_alive(None)
    again = r(x)
    assert torch.equal(plain.expert_ids, again.expert_ids) and torch.equal(plain.weights, again.weights)
    r.set_expert_alive([True] * E)  # all alive: no mask at all
    assert r.expert_alive_e is None and r.masked_experts() == []
    assert torch.equal(r(x).weights, plain.weights)


@pytest.mark.parametrize("spec, dead, message", [
    (RoutingSpec("topk", 2), [0, 1, 2, 3, 4, 5, 6], r"1 of 8 experts alive \(dead \[0, 1, 2, 3, 4, 5, 6\]\), "
                                                     r"fewer than top_k = 2"),
    (RoutingSpec("topk", 4), [0, 1, 2, 3, 4], r"3 of 8 experts alive .* fewer than top_k = 4"),
    (RoutingSpec("grouped", 4, groups=2), [0, 1, 2], r"group 0 \(experts 0\.\.3\) has 1 live experts, fewer than "
                                                      r"top_k / routing_groups = 2"),
    (RoutingSpec("top_p", 2, top_p=0.5, k_max=4), list(range(8)), r"0 of 8 experts alive .* fewer than the 1"),
    (RoutingSpec("node_limited", 2, max_nodes=1), [0], r"with experts \[0\] dead, max_nodes = 1: the 1 smallest "
                                                        r"nodes hold 1 experts, fewer than top_k = 2"),
], ids=["topk2", "topk4", "grouped", "top_p", "node_limited"])  # fmt: skip
def test_a_mask_leaving_too_few_experts_is_refused(spec, dead, message):
    r = _router(LinearRouter, spec)
    with pytest.raises(ValueError, match=message):
        r.set_expert_alive(_alive(dead))
    assert r.expert_alive_e is None  # refused: nothing changed


def test_mask_of_the_wrong_length_is_refused():
    r = _router(LinearRouter, RoutingSpec("topk", 2))
    with pytest.raises(ValueError, match=r"expert_alive has 7 entries: expected num_experts \(8\)"):
        r.set_expert_alive([True] * 7)


def test_lost_experts_are_those_with_every_replica_down():
    p = Placement(num_actors=3,
                  replicas=(((0,), (1,), (1, 2), (2,)), ((0, 1), (1,), (2,), (0,))))  # fmt: skip
    assert lost_experts(p, [1]) == {0: [1], 1: [1]}
    assert lost_experts(p, {1, 2}) == {0: [1, 2, 3], 1: [1, 2]}
    assert lost_experts(p, []) == {}


def test_a_masked_model_never_computes_a_dead_expert():
    cfg = parse_config({"model": {"preset": "tiny"}}).model
    model = build_model(cfg, 0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    for moe in model.moe_layers:
        moe.router.set_expert_alive(_alive([2, 5]))
    with torch.no_grad():
        model(tokens)
    load = model.expert_load()  # [L, E] tokens per expert in the last forward
    assert (load[:, [2, 5]] == 0).all() and load.sum() > 0


@pytest.mark.parametrize("value", ["drop", "MASK", 1])
def test_config_rejects_a_bad_on_expert_failure(value):
    with pytest.raises(ConfigError, match=r"transport\.on_expert_failure.*'fail' or 'mask'"):
        parse_config({"transport": {"on_expert_failure": value}})
    assert parse_config({"transport": {"on_expert_failure": "mask"}}).transport.on_expert_failure == "mask"
