"""The rule table: it covers this model's state dict exactly, its two directions are inverse, and at M32 size it
gives the shapes of the released checkpoint and the paper's parameter count."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.checkpoint.hf_layout import (
    all_rules,
    dense_rules,
    expected_hf_shapes,
    expert_rules,
    hf_expert_names,
    is_ignored_hf_tensor,
)
from moe_runtime.config import ModelConfig
from moe_runtime.model.accounting import count_params
from moe_runtime.model.router import AttentionRouter
from moe_runtime.model.transformer import build_model


def test_rules_cover_the_state_dict_exactly() -> None:
    cfg = ModelConfig.from_preset("tiny")
    state = build_model(cfg, seed=0).state_dict()
    seen: dict[str, set] = {}
    for rule in all_rules(cfg):
        assert rule.param in state, rule.param
        seen.setdefault(rule.param, set()).add(rule.expert)
        shape = state[rule.param].shape if rule.expert is None else state[rule.param].shape[1:]
        assert tuple(shape) == rule.param_shape, rule.param
    assert set(seen) == set(state)
    for key, experts in seen.items():
        assert experts == ({None} if "dispatcher" not in key else set(range(cfg.num_experts))), key


def test_the_two_directions_are_inverse() -> None:
    cfg = ModelConfig.from_preset("tiny")
    g = torch.Generator().manual_seed(0)
    for rule in all_rules(cfg):
        hf = [torch.randn(s, generator=g) for s in rule.hf_shapes]
        value = rule.to_param(hf)
        assert tuple(value.shape) == rule.param_shape
        assert all(torch.equal(a, b) for a, b in zip(rule.to_hf(value), hf)), rule.param
    with pytest.raises(ValueError, match=r"model.norm.weight: shape \[3\], expected \[64\]"):
        dense_rules(cfg)[-1].to_param([torch.ones(3)])


def test_orientation_of_the_non_trivial_rules() -> None:
    cfg = ModelConfig.from_preset("tiny")
    rules = {r.param: r for r in dense_rules(cfg)}
    q, k = torch.randn(64, 64), torch.randn(64, 64)
    assert torch.equal(rules["layers.0.attn.qk_proj.weight"].to_param([q, k]), torch.cat([q, k]))
    conv = torch.randn(32, 64, 2, 1)
    assert torch.equal(rules["layers.1.attn.lfa.conv1.weight"].to_param([conv]), conv[..., 0])
    wq, wk, wv = (torch.randn(8, 64) for _ in range(3))
    router = AttentionRouter(64, 8, 2)
    with torch.no_grad():
        router.wqkv.copy_(rules["layers.0.moe.router.wqkv"].to_param([wq, wk, wv]))
    x = torch.randn(5, 64)
    qr, kr, vr = x @ wq.T, x @ wk.T, x @ wv.T  # the router reads query, key, value in this order
    want = torch.einsum("tij,tj->ti", torch.softmax(qr[:, :, None] * kr[:, None, :], dim=-1), vr)
    torch.testing.assert_close(router.logits(x), want)
    r1, r2 = expert_rules(cfg, 1, 6)
    assert (r1.hf_names, r2.hf_names) == tuple((n,) for n in hf_expert_names(1, 6))
    w1 = torch.randn(256, 64)
    assert torch.equal(r1.to_param([w1]), w1.T) and r1.expert == 6
    with pytest.raises(ValueError, match=r"\(layer 2, expert 0\): the model has 2 layers"):
        expert_rules(cfg, 2, 0)


def test_m32_shapes_and_count() -> None:
    cfg = ModelConfig.from_preset("yuan-m32")
    shapes = expected_hf_shapes(cfg)
    assert shapes["model.embed_tokens.weight"] == (135040, 2048)
    assert shapes["model.layers.23.self_attn.q_proj.weight"] == (4096, 2048)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (2048, 4096)
    assert shapes["model.layers.0.self_attn.lf_gate.conv1.weight"] == (1024, 2048, 2, 1)
    assert shapes["model.layers.0.self_attn.lf_gate.conv2.weight"] == (2048, 1024, 2, 1)
    assert shapes["model.layers.0.mlp.gate.value.weight"] == (32, 2048)
    assert shapes["model.layers.5.mlp.experts.31.w1.weight"] == (16384, 2048)
    assert shapes["model.layers.5.mlp.experts.31.w2.weight"] == (2048, 8192)
    assert len(shapes) == 1 + 24 * (14 + 64) + 1
    total = 0
    for shape in shapes.values():
        total += torch.Size(shape).numel()
    assert total == count_params(cfg).total_params  # 39.94e9, the paper's "40B"


def test_ignored_tensors() -> None:
    assert is_ignored_hf_tensor("lm_head.weight")
    assert is_ignored_hf_tensor("model.layers.3.self_attn.rotary_emb.inv_freq")
    assert not is_ignored_hf_tensor("model.layers.3.self_attn.q_proj.weight")


def test_layouts_other_than_lfa_with_the_attention_router_are_refused() -> None:
    with pytest.raises(ValueError, match="LFA attention and the attention router only"):
        dense_rules(ModelConfig.from_preset("tiny", lfa=False))
