"""LFA / causal attention, the LFA filter, partial rotary embeddings and RMSNorm, each against an independent
transcription of the formulas in shared/yuan-m32.md (loops over positions, per-head weight slices)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moe_runtime.config import ModelConfig
from moe_runtime.model.attention import (
    CausalSelfAttention,
    LFAAttention,
    LocalizedFilter,
    apply_partial_rope,
    build_attention,
    rotary_tables,
)
from moe_runtime.model.norm import RMSNorm


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(preset="tiny", **overrides)


# ----------------------------------------------------------------------------------------------- references


def ref_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_filter(x, a0, a1, a, b0, b1, b, w, eps, y_prev_at_start=None):
    """Loop over t: y_t = A0 x_{t-1} + A1 x_t + a; z_t = B0 y_{t-1} + B1 y_t + b; u_t = RMSNorm(z_t + x_t).
    x_{-1} = 0 and y_{-1} = 0 unless `y_prev_at_start` is given (used to build the WRONG variant)."""
    bsz, seq, d = x.shape
    out = torch.empty_like(x)
    for bi in range(bsz):
        x_prev = torch.zeros(d, dtype=x.dtype)
        y_prev = torch.zeros(d // 2, dtype=x.dtype) if y_prev_at_start is None else y_prev_at_start
        for t in range(seq):
            y = a0 @ x_prev + a1 @ x[bi, t] + a
            z = b0 @ y_prev + b1 @ y + b
            out[bi, t] = ref_rmsnorm(z + x[bi, t], w, eps)
            x_prev, y_prev = x[bi, t], y
    return out


def filter_params(f: LocalizedFilter):
    c1, c2 = f.conv1, f.conv2
    # kernel index 0 multiplies the previous token, index 1 the current one (documented in LocalizedFilter).
    return (
        c1.weight[:, :, 0],
        c1.weight[:, :, 1],
        c1.bias,
        c2.weight[:, :, 0],
        c2.weight[:, :, 1],
        c2.bias,
        f.norm.weight,
        f.norm.eps,
    )


def ref_rope(x: torch.Tensor, rotary_dim: int, base: float) -> torch.Tensor:
    """Pair (i, i + r/2) of each head at position p rotated by angle p * base^(-2i/r), in float64."""
    out = x.clone()
    half = rotary_dim // 2
    for p in range(x.shape[-2]):
        for i in range(half):
            ang = p * base ** (-2.0 * i / rotary_dim)
            c, s = math.cos(ang), math.sin(ang)
            x1, x2 = x[..., p, i], x[..., p, i + half]
            out[..., p, i] = x1 * c - x2 * s
            out[..., p, i + half] = x2 * c + x1 * s
    return out


def ref_causal_softmax_attention(q, k, v):
    """q, k, v [S, Dh] -> [S, Dh] with an explicit mask."""
    seq, dh = q.shape
    scores = q @ k.T / math.sqrt(dh)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def randomize_biases(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                p.copy_(
                    torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + (1.0 if "norm" in name else 0)
                )


# ----------------------------------------------------------------------------------------------- RMSNorm


def test_rmsnorm_matches_formula_and_runs_in_fp32():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5).double()
    assert torch.equal(norm.weight, torch.ones(16, dtype=torch.float64))
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(norm(x), ref_rmsnorm(x, norm.weight, 1e-5), rtol=1e-12, atol=1e-12)

    # fp16 input whose squares overflow fp16 (300^2 > 65504): only a float32 computation gives ~1.
    half = RMSNorm(8).half()
    y = half(torch.full((2, 8), 300.0, dtype=torch.float16))
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), torch.ones(2, 8), rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------- filter


def test_filter_matches_loop_reference_and_pads_zero_at_both_convs():
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    f = LocalizedFilter(8, eps=1e-6, init_std=0.5).double()
    randomize_biases(f, gen)
    x = torch.randn(2, 6, 8, dtype=torch.float64, generator=gen)
    params = filter_params(f)
    with torch.no_grad():
        got = f(x)
        want = ref_filter(x, *params)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

        # The WRONG variant (conv2's first position sees conv1's bias `a` as its previous input) differs only at
        # position 0: the test can tell the two apart.
        a = params[2]
        wrong = ref_filter(x, *params, y_prev_at_start=a.clone())
        assert (got[:, 0] - wrong[:, 0]).abs().max() > 1e-3
        torch.testing.assert_close(got[:, 1:], wrong[:, 1:], rtol=1e-12, atol=1e-12)

        # Zero input: y_t = a for every t, so z_0 = B1 a + b but z_t = (B0 + B1) a + b for t >= 1.
        _, _, a, b0, b1, b, w, eps = params
        u = f(torch.zeros(1, 3, 8, dtype=torch.float64))[0]
        torch.testing.assert_close(u[0], ref_rmsnorm(b1 @ a + b, w, eps))
        torch.testing.assert_close(u[2], ref_rmsnorm((b0 + b1) @ a + b, w, eps))


def test_filter_is_causal_with_receptive_field_of_three_tokens():
    gen = torch.Generator().manual_seed(2)
    f = LocalizedFilter(8, init_std=0.5).double()
    randomize_biases(f, gen)
    x = torch.randn(1, 8, 8, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        base = f(x)
        for t in range(8):
            x2 = x.clone()
            x2[:, t] += 1.0
            diff = (f(x2) - base).abs().amax(dim=(0, 2))  # per position
            changed = {p for p in range(8) if diff[p] > 1e-9}
            assert changed == {p for p in (t, t + 1, t + 2) if p < 8}, (t, changed)


# ----------------------------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("rotary_dim,head_dim,base", [(16, 32, 10000.0), (8, 8, 40890.0), (4, 12, 100.0)])
def test_partial_rope(rotary_dim, head_dim, base):
    torch.manual_seed(3)
    seq = 9
    x = torch.randn(2, 3, seq, head_dim, dtype=torch.float64)
    cos, sin = rotary_tables(rotary_dim, seq + 4, base, "cpu")  # more rows than needed is fine
    assert cos.dtype == torch.float32 and cos.shape == (seq + 4, rotary_dim)
    y = apply_partial_rope(x, cos, sin, rotary_dim)
    assert y.shape == x.shape and y.dtype == x.dtype
    # channels past rotary_dim untouched; position 0 is the identity
    assert torch.equal(y[..., rotary_dim:], x[..., rotary_dim:])
    assert torch.equal(y[..., 0, :], x[..., 0, :])
    # a rotation: each pair (i, i + r/2) keeps its norm
    half = rotary_dim // 2

    def pair_norm(t):
        return t[..., :half] ** 2 + t[..., half:rotary_dim] ** 2

    torch.testing.assert_close(pair_norm(y), pair_norm(x), rtol=1e-6, atol=1e-6)
    # ... by the right angles (tables are float32, hence the tolerance)
    torch.testing.assert_close(y, ref_rope(x, rotary_dim, base), rtol=1e-5, atol=1e-5)
    # and changed something away from position 0
    assert (y[..., 1:, :rotary_dim] - x[..., 1:, :rotary_dim]).abs().max() > 1e-2


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(4)
    r, dh, seq = 16, 24, 12
    cos, sin = rotary_tables(r, seq, 10000.0, "cpu")
    q1, k1 = torch.randn(2, dh, dtype=torch.float64)
    q = q1.expand(1, 1, seq, dh)
    k = k1.expand(1, 1, seq, dh)
    qr, kr = apply_partial_rope(q, cos, sin, r)[0, 0], apply_partial_rope(k, cos, sin, r)[0, 0]
    s = qr @ kr.T  # s[m, n] = <rope(q, m), rope(k, n)>
    for off in range(-3, 4):
        diag = torch.diagonal(s, offset=off)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- attention


def ref_lfa(m: LFAAttention, x: torch.Tensor, naive_split: bool = False) -> torch.Tensor:
    """Independent LFA: loop filter, per-head slices of qk_proj.weight ([q_h | k_h] per head), loop rope."""
    h, dh, r, base = m.num_heads, m.head_dim, m.rotary_dim, m.rotary.base
    u = ref_filter(x, *filter_params(m.lfa))
    w_qk = m.qk_proj.weight  # [2*H*Dh, d]
    outs = []
    for bi in range(x.shape[0]):
        heads = []
        for hi in range(h):
            if naive_split:  # the wrong reading: first half of the whole matrix is q, second half k
                wq, wk = w_qk[hi * dh : (hi + 1) * dh], w_qk[(h + hi) * dh : (h + hi + 1) * dh]
            else:
                rows = w_qk[hi * 2 * dh : (hi + 1) * 2 * dh]
                wq, wk = rows[:dh], rows[dh:]
            wv = m.v_proj.weight[hi * dh : (hi + 1) * dh]
            q = ref_rope(u[bi] @ wq.T, r, base)
            k = ref_rope(u[bi] @ wk.T, r, base)
            heads.append(ref_causal_softmax_attention(q, k, x[bi] @ wv.T))
        outs.append(torch.cat(heads, dim=-1) @ m.o_proj.weight.T)
    return torch.stack(outs)


def test_lfa_matches_per_head_reference_and_splits_q_k_per_head():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    m = LFAAttention(tiny(init_std=0.2)).double()
    randomize_biases(m, gen)
    x = torch.randn(2, 7, 64, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        got = m(x)
        want = ref_lfa(m, x)
        assert want.abs().max() > 0.1
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got - ref_lfa(m, x, naive_split=True)).abs().max() > 1e-2


def test_causal_self_attention_matches_reference():
    torch.manual_seed(6)
    m = CausalSelfAttention(tiny(lfa=False, init_std=0.2)).double()
    x = torch.randn(1, 6, 64, dtype=torch.float64)
    dh, r = m.head_dim, m.rotary_dim
    with torch.no_grad():
        heads = []
        for hi in range(m.num_heads):
            sl = slice(hi * dh, (hi + 1) * dh)
            q = ref_rope(x[0] @ m.q_proj.weight[sl].T, r, m.rotary.base)
            k = ref_rope(x[0] @ m.k_proj.weight[sl].T, r, m.rotary.base)
            heads.append(ref_causal_softmax_attention(q, k, x[0] @ m.v_proj.weight[sl].T))
        want = torch.cat(heads, dim=-1) @ m.o_proj.weight.T
        torch.testing.assert_close(m(x)[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lfa", [True, False])
def test_attention_is_causal(lfa):
    torch.manual_seed(7)
    m = build_attention(tiny(lfa=lfa, init_std=0.2))
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        base = m(x)
        for t in (0, 3, 6, 8):
            x2 = x.clone()
            x2[:, t + 1 :] = torch.randn(2, 10 - t - 1, 64)
            out = m(x2)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
            assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 1e-3  # the later positions do see it


@pytest.mark.parametrize("lfa", [True, False])
def test_every_parameter_gets_a_gradient(lfa):
    torch.manual_seed(8)
    m = build_attention(tiny(lfa=lfa))
    x = torch.randn(2, 5, 64, requires_grad=True)
    (m(x) * torch.randn(2, 5, 64)).sum().backward()
    names = [n for n, _ in m.named_parameters()]
    assert names, "no parameters"
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_tiny_shapes_builder_and_yuan_parameter_count():
    cfg = ModelConfig(preset="tiny")
    d, hd = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    lfa = build_attention(cfg)
    plain = build_attention(tiny(lfa=False))
    assert type(lfa) is LFAAttention and type(plain) is CausalSelfAttention
    shapes = {n: tuple(p.shape) for n, p in lfa.named_parameters()}
    assert shapes == {
        "lfa.conv1.weight": (d // 2, d, 2),
        "lfa.conv1.bias": (d // 2,),
        "lfa.conv2.weight": (d, d // 2, 2),
        "lfa.conv2.bias": (d,),
        "lfa.norm.weight": (d,),
        "v_proj.weight": (hd, d),
        "qk_proj.weight": (2 * hd, d),
        "o_proj.weight": (d, hd),
    }
    # linear weights drawn with std = init_std
    assert abs(lfa.qk_proj.weight.std().item() - cfg.init_std) < 0.2 * cfg.init_std
    x = torch.randn(2, 16, d)
    assert lfa(x).shape == (2, 16, d) and plain(x).shape == (2, 16, d)
    # rotary tables are cached buffers, not checkpoint state
    assert not any("rotary" in k for k in lfa.state_dict())
    assert lfa.rotary.cos_cached.shape == (cfg.max_seq_len, cfg.rotary_dim)

    # The full Yuan-M32 attention (built without memory on the meta device) has the paper's parameter count.
    with torch.device("meta"):
        big = build_attention(ModelConfig(preset="yuan-m32"))
    assert sum(p.numel() for p in big.parameters()) == 33_554_432 + 8_393_728


def test_rotary_cache_grows_and_survives_dtype_casts():
    torch.manual_seed(9)
    short = LFAAttention(tiny(max_seq_len=8, init_std=0.2))
    long = LFAAttention(tiny(max_seq_len=32, init_std=0.2))
    long.load_state_dict(short.state_dict())
    x = torch.randn(1, 12, 64)
    with torch.no_grad():
        torch.testing.assert_close(short(x), long(x), rtol=0, atol=0)
    assert short.rotary.cos_cached.shape[0] == 12

    m = LFAAttention(tiny(init_std=0.2)).double()  # .double() casts the float buffers too
    assert m.rotary.cos_cached.dtype == torch.float64
    with torch.no_grad():
        y = m(x.double())
    assert m.rotary.cos_cached.dtype == torch.float32 and y.dtype == torch.float64


def test_wrong_hidden_size_is_a_clear_error():
    m = build_attention(tiny())
    with pytest.raises(ValueError, match=r"last dim = 48: expected hidden_size \(64\)"):
        m(torch.randn(1, 4, 48))
    with pytest.raises(ValueError, match=r"shape \(4, 64\)"):
        m(torch.randn(4, 64))
    with pytest.raises(ValueError, match="last dim = 48"):
        build_attention(tiny(lfa=False))(torch.randn(1, 4, 48))


# ----------------------------------------------------------------------------------------------- rope = "hf"


def official_hf_rope(q: torch.Tensor, dim: int, seq: int, base: int = 10000) -> torch.Tensor:
    """`YuanRotaryEmbedding` + `apply_rotary_pos_emb_0` as released (IEIT-Yuan/Yuan2.0-M32 yuan_moe_hf_model.py),
    for positions 0..seq-1 in q's dtype."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    inv_freq = inv_freq.to(torch.bfloat16)
    t = torch.arange(seq, dtype=inv_freq.dtype)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, None].to(torch.float32).to(q.dtype), emb.sin()[None, None].to(torch.float32).to(q.dtype)
    rot_dim = sin.shape[-1]
    q_rot, q_pass = q[..., :rot_dim], q[..., rot_dim:]
    half = torch.cat((-q_rot[..., rot_dim // 2:], q_rot[..., : rot_dim // 2]), dim=-1)
    return torch.cat((q_rot * cos[:, :, :seq] + half * sin[:, :, :seq], q_pass), dim=-1)


@pytest.mark.parametrize("dim,head_dim", [(16, 32), (32, 64), (128, 256)])
def test_hf_rope_is_the_released_code_bit_for_bit(dim, head_dim):
    seq = 4200
    cos, sin = rotary_tables(dim, seq, 10000.0, "cpu", mode="hf")
    q = torch.randn(1, 2, seq, head_dim)
    assert torch.equal(apply_partial_rope(q, cos, sin, dim), official_hf_rope(q, dim, seq))
    # the released tables take positions as a bf16 arange: 257 reads 256, 4090..4100 all read 4096
    assert torch.equal(cos[256], cos[257]) and not torch.equal(cos[255], cos[256])
    assert torch.equal(cos[4090], cos[4100])
    exact, _ = rotary_tables(dim, seq, 10000.0, "cpu")
    assert (exact[:256] - cos[:256]).abs().max() > 1e-3  # bf16 frequencies differ at once
    assert (exact - cos).abs().max() > 0.5  # and the angles are far apart at long positions


def test_rope_mode_reaches_the_attention_and_survives_rebuilds():
    m = LFAAttention(tiny(rope="hf", max_seq_len=16))
    assert m.rotary.mode == "hf" and "mode=hf" in repr(m.rotary)
    assert torch.equal(m.rotary.cos_cached, rotary_tables(16, 16, 10000.0, mode="hf")[0])
    cos, _ = m.rotary(300, torch.device("cpu"))  # longer than the cache: rebuilt, still the hf tables
    assert torch.equal(cos, rotary_tables(16, 300, 10000.0, mode="hf")[0])
    assert CausalSelfAttention(tiny(lfa=False, rope="hf")).rotary.mode == "hf"
    assert LFAAttention(tiny()).rotary.mode == "exact"
    with pytest.raises(ValueError, match="rope = 'fast'"):
        rotary_tables(16, 4, 10000.0, mode="fast")
