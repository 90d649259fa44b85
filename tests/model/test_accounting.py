"""Parameter / FLOP accounting: the paper's numbers for yuan-m32, hand-computed numbers for tiny and small."""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest
from torch import nn

from moe_runtime.config import ModelConfig
from moe_runtime.model.accounting import (
    ModelCounts,
    count_params,
    flops_per_token,
    flops_report,
    flops_table_rows,
    format_count,
    format_flops,
)
from moe_runtime.model.experts import SwiGLUExperts

M32 = ModelConfig.from_preset("yuan-m32")


# --------------------------------------------------------------------------------------------- yuan-m32


def test_yuan_m32_components_match_the_paper():
    b = count_params(M32).breakdown
    assert b["attention_per_layer"] == 33_554_432
    assert b["lfa_per_layer"] == 8_393_728
    assert b["router_per_layer"] == 196_608
    assert b["norms_per_layer"] == 4096
    assert b["expert"] == 50_331_648
    assert b["dense_per_layer"] == 42_148_864
    assert b["layer"] == 1_652_761_600
    assert b["embedding"] == 276_561_920
    assert b["final_norm"] == 2048


def test_yuan_m32_totals_match_the_paper():
    c = count_params(M32)
    assert c.total_params == 24 * 1_652_761_600 + 276_561_920 + 2048 == 39_942_842_368
    assert c.active_params == 24 * (42_148_864 + 2 * 50_331_648) + 276_561_920 + 2048 == 3_704_055_808
    assert c.total_params == pytest.approx(40e9, rel=0.01)
    assert c.active_params == pytest.approx(3.7e9, rel=0.01)
    b = c.breakdown
    parts = (
        b["attention"] + b["lfa"] + b["router"] + b["norms"] + b["experts"] + b["embedding"] + b["final_norm"]
    )
    assert parts == c.total_params


def test_yuan_m32_flops():
    f = flops_per_token(M32, 4096)
    assert f["forward_flops_per_token"] == 2 * 3_704_055_808 == 7_408_111_616
    assert f["forward_flops_per_token"] == pytest.approx(7.4e9, rel=0.01)
    assert f["training_flops_per_token"] == 6 * 3_704_055_808
    assert f["training_flops_per_token"] == pytest.approx(22.2e9, rel=0.01)
    assert f["attention_score_flops_per_token"] == 4 * 24 * 4096 * 4096 == 1_610_612_736
    assert f["attention_score_flops_per_token_causal"] == 805_306_368
    assert f["router_flops_per_token"] == 24 * (2 * 3 * 32 * 2048 + 2 * 2 * 32 * 32)
    assert f["router_mixing_flops_per_token"] == 24 * 4 * 32 * 32 == 98_304
    assert f["forward_flops_per_token_full"] == 7_408_111_616 + 805_306_368
    assert f["training_flops_per_token_full"] == 3 * (7_408_111_616 + 805_306_368)
    # the attention-score term grows linearly with the sequence
    assert flops_per_token(M32, 16384)["attention_score_flops_per_token"] == 4 * 1_610_612_736
    assert flops_per_token(M32)["attention_score_flops_per_token"] == 1_610_612_736  # default: max_seq_len


def test_accounting_builds_nothing_heavy():
    """The 40B count must come from arithmetic: a built M32 would allocate ~160 GB."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        report = flops_report(M32, 4096)
        count_params(M32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"peak {peak} bytes"
    assert time.perf_counter() - t0 < 1.0
    assert report["total_params"] == 39_942_842_368


def test_report_is_flat_json_and_table_formats():
    r = flops_report(M32, 4096)
    assert json.loads(json.dumps(r)) == r
    assert all(not isinstance(v, (dict, list)) for v in r.values())
    for key in (
        "total_params",
        "active_params",
        "forward_flops_per_token",
        "training_flops_per_token",
        "attention_score_flops_per_token",
        "attention_score_flops_per_token_causal",
        "router_flops_per_token",
        "forward_flops_per_token_full",
        "seq_len",
        "params_expert",
        "params_layer",
    ):
        assert key in r, key
    assert r["seq_len"] == 4096 and r["params_layer"] == 1_652_761_600
    rows = dict(flops_table_rows(r))
    assert rows["total parameters"] == "39.94 B"
    assert rows["active parameters"].startswith("3.70 B")
    assert rows["forward FLOPs/token (2N)"] == "7.41 GFLOP"
    assert rows["training FLOPs/token (6N)"] == "22.22 GFLOP"
    assert rows["  embedding (tied)"] == "276.56 M"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in flops_table_rows(r))


def test_formatters():
    assert format_count(39_942_842_368) == "39.94 B"
    assert format_count(1_500) == "1.50 K"
    assert format_count(2_000_000_000_000) == "2.00 T"
    assert format_count(42) == "42"
    assert format_flops(7_408_111_616) == "7.41 GFLOP"
    assert format_flops(33_280) == "33.28 KFLOP"
    assert format_flops(1.5e13) == "15.00 TFLOP"
    assert format_flops(12) == "12 FLOP"


# --------------------------------------------------------------------------------------------- tiny / small by hand

# tiny: vocab 264, d 64, 2 layers, 2 heads x 32 (W = 64), 8 experts top-2, ffn 128.
TINY_ATTN = 64 * 64 + 64 * 128 + 64 * 64  # V + QK + O = 16384
TINY_LFA = (2 * 64 * 32 + 32) + (2 * 32 * 64 + 64) + 64  # 4128 + 4160 + 64 = 8352
TINY_ROUTER = 3 * 8 * 64  # 1536
TINY_NORMS = 2 * 64  # 128
TINY_EXPERT = 64 * 256 + 128 * 64  # 16384 + 8192 = 24576
TINY_EMB = 264 * 64  # 16896


def test_tiny_hand_computed():
    assert (TINY_ATTN, TINY_LFA, TINY_ROUTER, TINY_EXPERT) == (16384, 8352, 1536, 24576)
    c = count_params(ModelConfig.from_preset("tiny"))
    b = c.breakdown
    assert b["attention_per_layer"] == 16384
    assert b["lfa_per_layer"] == 8352
    assert b["router_per_layer"] == 1536
    assert b["norms_per_layer"] == 128
    assert b["expert"] == 24576
    assert b["dense_per_layer"] == 16384 + 8352 + 1536 + 128 == 26400
    assert b["layer"] == 26400 + 8 * 24576 == 223_008
    assert c.total_params == 2 * 223_008 + 16896 + 64 == 462_976
    assert c.active_params == 2 * (26400 + 2 * 24576) + 16896 + 64 == 168_064


def test_tiny_flops_hand_computed():
    f = flops_per_token(ModelConfig.from_preset("tiny"), 128)
    assert f["forward_flops_per_token"] == 2 * 168_064
    assert f["training_flops_per_token"] == 6 * 168_064
    assert f["attention_score_flops_per_token"] == 4 * 2 * 128 * 64 == 65_536
    assert f["attention_score_flops_per_token_causal"] == 32_768
    assert f["router_flops_per_token"] == 2 * (2 * 3 * 8 * 64 + 2 * 2 * 8 * 8) == 6_656
    assert f["forward_flops_per_token_full"] == 336_128 + 32_768
    lin = flops_per_token(ModelConfig.from_preset("tiny", router="linear"), 128)
    assert lin["router_flops_per_token"] == 2 * (2 * 8 * 64) == 2048
    assert lin["router_mixing_flops_per_token"] == 0


def test_small_hand_computed():
    # small: vocab 264, d 256, 4 layers, 4 heads x 64 (W = 256), 16 experts top-2, ffn 512.
    attn = 256 * 256 + 256 * 512 + 256 * 256  # 262144
    lfa = (2 * 256 * 128 + 128) + (2 * 128 * 256 + 256) + 256  # 65664 + 65792 + 256 = 131712
    router = 3 * 16 * 256  # 12288
    expert = 256 * 1024 + 512 * 256  # 393216
    assert (attn, lfa, router, expert) == (262_144, 131_712, 12_288, 393_216)
    c = count_params(ModelConfig.from_preset("small"))
    assert c.breakdown["dense_per_layer"] == 262_144 + 131_712 + 12_288 + 512 == 406_656
    assert c.breakdown["layer"] == 406_656 + 16 * 393_216 == 6_698_112
    assert c.total_params == 4 * 6_698_112 + 264 * 256 + 256 == 26_860_288
    assert c.active_params == 4 * (406_656 + 2 * 393_216) + 264 * 256 + 256 == 4_840_192


@pytest.mark.parametrize(
    ("router", "lfa", "total", "router_per_layer", "lfa_per_layer"),
    [
        ("attention", True, 462_976, 1536, 8352),
        ("linear", True, 462_976 - 2 * (1536 - 512), 8 * 64, 8352),  # 460_928
        ("attention", False, 462_976 - 2 * 8352, 1536, 0),  # 446_272
        ("linear", False, 462_976 - 2 * 1024 - 2 * 8352, 512, 0),  # 444_224
    ],
)
def test_tiny_variants(router, lfa, total, router_per_layer, lfa_per_layer):
    c = count_params(ModelConfig.from_preset("tiny", router=router, lfa=lfa))
    assert c.total_params == total
    assert c.breakdown["router_per_layer"] == router_per_layer
    assert c.breakdown["lfa_per_layer"] == lfa_per_layer
    assert c.breakdown["attention_per_layer"] == 4 * 64 * 64  # Q,K,V,O or V,QK,O: same width
    assert c.active_params == total - 2 * (8 - 2) * 24_576


def test_top_k_and_experts_change_active_and_total():
    base = count_params(ModelConfig.from_preset("tiny"))
    k4 = count_params(ModelConfig.from_preset("tiny", top_k=4))
    assert k4.total_params == base.total_params
    assert k4.active_params == base.active_params + 2 * 2 * 24_576
    e16 = count_params(ModelConfig.from_preset("tiny", num_experts=16))
    # 8 more experts per layer and a router with 8 more rows in each of Wq, Wk, Wv
    assert e16.total_params == base.total_params + 2 * (8 * 24_576 + 3 * 8 * 64)
    assert e16.active_params == base.active_params + 2 * 3 * 8 * 64


def test_counts_match_torch_modules_of_the_same_shapes():
    """Independent check of the formulas against torch modules with the documented shapes (tiny)."""
    cfg = ModelConfig.from_preset("tiny")
    d, w, e, f = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_experts, cfg.ffn_hidden_size

    def numel(*mods: nn.Module) -> int:
        return sum(p.numel() for m in mods for p in m.parameters())

    b = count_params(cfg).breakdown
    assert (
        numel(nn.Linear(d, w, bias=False), nn.Linear(d, 2 * w, bias=False), nn.Linear(w, d, bias=False))
        == b["attention_per_layer"]
    )
    assert numel(nn.Conv1d(d, d // 2, 2), nn.Conv1d(d // 2, d, 2), nn.RMSNorm(d)) == b["lfa_per_layer"]
    assert numel(*(nn.Linear(d, e, bias=False) for _ in range(3))) == b["router_per_layer"]
    assert numel(SwiGLUExperts(e, d, f)) == b["experts_per_layer"] == e * b["expert"]
    assert numel(nn.Embedding(cfg.vocab_size, d)) == b["embedding"]


def test_model_counts_is_frozen():
    c = count_params(ModelConfig.from_preset("tiny"))
    assert isinstance(c, ModelCounts)
    with pytest.raises(AttributeError):
        c.total_params = 0  # type: ignore[misc]
    assert c.expert_params == 24_576 and c.layer_params == 223_008 and c.dense_params_per_layer == 26_400
    assert count_params(ModelConfig.from_preset("tiny")) == c
