"""Attention for the Yuan 2.0-M32-style decoder: Localized Filtering-based Attention (LFA) and plain causal
self-attention, both with partial NeoX-style rotary embeddings. Pure PyTorch.

LFA (Yuan 2.0 / 2.0-M32; HF `yuan_moe_hf_model.py`, `LocalizedFiltering` + `YuanAttention`), per layer:

    v = Wv x                                        # from the (layer-)normed input x, d -> H*Dh
    y_t = A0 x_{t-1} + A1 x_t + a                   # causal conv, kernel 2, d -> d/2, zero x_{-1}
    z_t = B0 y_{t-1} + B1 y_t + b                   # causal conv, kernel 2, d/2 -> d, zero y_{-1}
    u_t = RMSNorm(z_t + x_t)                        # the filter's own norm
    [q_h | k_h] = (Wqk u)[h*2*Dh : (h+1)*2*Dh]      # d -> 2*H*Dh, per head: first Dh = q, last Dh = k
    q, k = rope(q), rope(k)                         # first rotary_dim channels of each head only
    out = Wo causal_softmax(q k^T / sqrt(Dh)) v

Shapes: activations are [B, S, d]; per-head tensors are [B, H, S, Dh].

Decoding caches (end of the file): per layer the keys (after rope) and values, and for LFA the last two filter
inputs (the official HF code's `past_key_value[2]`); `forward(x, cache, step)` continues cached rows and gives the
numbers of a full forward over the whole sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moe_runtime.config import ModelConfig
from moe_runtime.model.norm import RMSNorm

# ----------------------------------------------------------------------------------------------- rotary


RopeMode = Literal["exact", "hf"]


def rotary_tables(
    rotary_dim: int, seq_len: int, base: float, device: torch.device | str | None = None, mode: RopeMode = "exact"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [seq_len, rotary_dim] in float32 for positions 0..seq_len-1.

    inv_freq_i = base^(-2i/rotary_dim) for i < rotary_dim/2: the frequencies span the rotated part only (for
    Yuan-M32, 128 of the 256 head channels). Each frequency appears twice (NeoX layout: channel i and
    i + rotary_dim/2 form a pair). mode "exact" computes everything in float32 (what Megatron and vLLM do);
    "hf" gives the released HF code's tables bit for bit (`_hf_rotary_tables`).
    """
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim = {rotary_dim}: must be even")
    if mode == "hf":
        return _hf_rotary_tables(rotary_dim, seq_len, base, device)
    if mode != "exact":
        raise ValueError(f"rope = {mode!r}: expected 'exact' or 'hf'")
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim)
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # [S, r/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [S, r]
    return emb.cos(), emb.sin()


def _hf_rotary_tables(
    rotary_dim: int, seq_len: int, base: float, device: torch.device | str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables of `YuanRotaryEmbedding` (IEIT-Yuan/Yuan2.0-M32 `yuan_moe_hf_model.py`), same ops in the same
    order: inv_freq = 1 / base^(2i/r) in float32, rounded to bf16; the positions are a bf16 arange (so positions
    above 256 are rounded to 8 significant bits: 4090..4100 all read 4096); angles, cos and sin in bf16. The HF
    class always passes base 10000; the values are bf16 numbers, returned exactly as float32.
    """
    inv_freq = (1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim))).to(
        torch.bfloat16
    )
    t = torch.arange(seq_len, device=device, dtype=torch.bfloat16)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_partial_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int
) -> torch.Tensor:
    """Rotate the first `rotary_dim` channels of each head of x [B, H, S, Dh], NeoX rotate-half style.

    cos/sin are tables from `rotary_tables` with at least S rows (row p = position p). Channels rotary_dim..Dh
    pass through unchanged. The rotation runs in at least float32 and is cast back to x's dtype.
    """
    if rotary_dim == 0:
        return x
    seq_len = x.shape[-2]
    if cos.shape[0] < seq_len or cos.shape[-1] != rotary_dim or sin.shape != cos.shape:
        raise ValueError(
            f"rotary tables of shape {tuple(cos.shape)}: need at least {seq_len} rows of {rotary_dim} channels"
        )
    return _rotate(x, cos[:seq_len], sin[:seq_len], rotary_dim)


def apply_partial_rope_at(
    x_bhsd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions_bs: torch.Tensor, rotary_dim: int
) -> torch.Tensor:
    """`apply_partial_rope` with each row's own positions: token (b, s) is rotated by table row positions[b, s]
    (a decoding step continues every sequence from its own length)."""
    if rotary_dim == 0:
        return x_bhsd
    return _rotate(x_bhsd, cos[positions_bs].unsqueeze(1), sin[positions_bs].unsqueeze(1), rotary_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """NeoX rotate-half on the first rotary_dim channels; cos/sin broadcast against x[..., :rotary_dim]."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xr = x[..., :rotary_dim]
    half = rotary_dim // 2
    if x.dtype == compute == cos.dtype == sin.dtype:  # no casts to call (each a no-op dispatch otherwise)
        out = xr * cos + torch.cat((-xr[..., half:], xr[..., :half]), dim=-1) * sin
        return torch.cat((out, x[..., rotary_dim:]), dim=-1)
    xr = xr.to(compute)
    rotated = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)  # rotate_half
    out = xr * cos.to(compute) + rotated * sin.to(compute)
    return torch.cat((out.to(x.dtype), x[..., rotary_dim:]), dim=-1)


class RotaryCache(nn.Module):
    """cos/sin tables cached as non-persistent buffers (not in state_dict) for positions < max_seq_len.

    Rebuilt on demand for a longer sequence, another device, or when a dtype cast of the module (e.g.
    `.to(torch.bfloat16)`) has touched the float32 tables.
    """

    def __init__(self, rotary_dim: int, base: float, max_seq_len: int, mode: RopeMode = "exact"):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.base = base
        self.mode = mode
        cos, sin = rotary_tables(rotary_dim, max_seq_len, base, mode=mode)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos_cached
        if cos.shape[0] < seq_len or cos.device != device or cos.dtype != torch.float32:
            cos, sin = rotary_tables(self.rotary_dim, max(seq_len, cos.shape[0]), self.base, device, self.mode)
            self.cos_cached, self.sin_cached = cos, sin
        return self.cos_cached[:seq_len], self.sin_cached[:seq_len]

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}, base={self.base}, mode={self.mode}, cached={self.cos_cached.shape[0]}"


# ----------------------------------------------------------------------------------------------- LFA filter


class LocalizedFilter(nn.Module):
    """The LFA filter: two causal kernel-2 convolutions along the sequence, a residual and its own RMSNorm.

    Implemented with `nn.Conv1d` (bias=True) on [B, C, S] after padding ONE zero step before the first token,
    separately at each convolution, so the second convolution's first position sees a zero previous
    intermediate (not conv1's bias). Weight layout: conv.weight[:, :, 0] multiplies the previous token (A0/B0),
    conv.weight[:, :, 1] the current one (A1/B1). The official HF Conv2d weights [out, in, 2, 1] (padding (1, 0),
    outputs truncated to S) have the same index order: squeeze the last dim to load them.

    Init: conv weights normal(init_std), biases zero (like every other projection here).
    Input/output: [B, S, d]. Receptive field: tokens t-2..t.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, init_std: float = 0.02):
        super().__init__()
        if hidden_size % 2:
            raise ValueError(f"hidden_size = {hidden_size}: the LFA filter needs an even hidden size")
        self.hidden_size = hidden_size
        self.conv1 = nn.Conv1d(hidden_size, hidden_size // 2, kernel_size=2, bias=True)
        self.conv2 = nn.Conv1d(hidden_size // 2, hidden_size, kernel_size=2, bias=True)
        self.norm = RMSNorm(hidden_size, eps)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, std=init_std)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.hidden_size, "LocalizedFilter")
        h = x.transpose(1, 2)  # [B, d, S]
        y = self.conv1(F.pad(h, (1, 0)))  # zero x_{-1}       -> [B, d/2, S]
        z = self.conv2(F.pad(y, (1, 0)))  # zero y_{-1}       -> [B, d, S]
        return self.norm(z.transpose(1, 2) + x)

    def forward_cached(
        self, x_bsd: torch.Tensor, inputs_b2d: torch.Tensor, step: CacheStep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The filter for new tokens that continue each row's sequence: the numbers `forward` gives over the whole
        sequence. inputs_b2d: each row's two filter inputs before its first new token, zeros before the sequence
        start (as the HF code keeps them: `[0, x0]` after a one-token prompt). Returns (u [B, S, d], the inputs
        at each row's last two real positions)."""
        _check_input(x_bsd, self.hidden_size, "LocalizedFilter")
        mods = self._modules  # by dict: each nn.Module attribute miss costs ~5k instructions (a decode step)
        conv1, conv2 = mods["conv1"], mods["conv2"]
        window = torch.cat((inputs_b2d, x_bsd), dim=1)  # [B, 2+S, d]: positions start-2 .. start+S-1
        # Each kernel-2 conv as one linear over [previous | current] features: CPU conv1d on a few columns is
        # 3-6x slower than the matmul (equal up to fp32 rounding)
        b, n, d = window.shape
        if b == 1 and step.has_past_b11 is None and step.lfa_tail_b2 is None:
            # one unpadded row continuing its sequence (batch-1 decode): 2-D throughout, the pairs as overlapping
            # views of the fresh window and y (_pairs_linear's), no unsqueezes; z + x broadcasts back to [1, S, d]
            w1, w2 = _conv_as_linear(conv1), _conv_as_linear(conv2)
            y = F.linear(window.as_strided((n - 1, 2 * d), (d, 1)), w1, conv1._parameters["bias"])  # [S+1, d/2]
            h = d // 2
            z = F.linear(y.as_strided((n - 2, 2 * h), (h, 1)), w2, conv2._parameters["bias"])  # [S, d]
            return mods["norm"](z + x_bsd), window.narrow(1, n - 2, 2)
        y = _pairs_linear(window, _conv_as_linear(conv1), conv1._parameters["bias"])  # [B, S+1, d/2]: start-1..
        if step.has_past_b11 is not None:
            y[:, :1] *= step.has_past_b11  # y_{-1} is the second conv's zero padding, not conv1's bias
        z = _pairs_linear(y, _conv_as_linear(conv2), conv2._parameters["bias"])  # [B, S, d]
        u = mods["norm"](z + x_bsd)
        if step.lfa_tail_b2 is None:
            return u, window[:, -2:]
        tail = step.lfa_tail_b2.unsqueeze(-1).expand(-1, -1, window.shape[-1])  # window columns n, n+1
        return u, window.gather(1, tail)


def _pairs(x_bsc: torch.Tensor) -> torch.Tensor:
    """[B, S, C] -> [B, S-1, 2C]: each position's features after its predecessor's."""
    return torch.cat((x_bsc[:, :-1], x_bsc[:, 1:]), dim=-1)


def _pairs_linear(x_bsc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """F.linear(_pairs(x), weight, bias). One contiguous row: the pairs as an overlapping 2-D view (pair j =
    elements C*j .. C*j+2C-1), which addmm copies to the same contiguous matrix the cat gives, so the same addmm
    on the same numbers (bit for bit) with two dispatches fewer; other batches: the cat."""
    b, s, c = x_bsc.shape
    if b == 1 and x_bsc.is_contiguous():
        return F.linear(x_bsc.as_strided((s - 1, 2 * c), (c, 1)), weight, bias).unsqueeze(0)
    return F.linear(_pairs(x_bsc), weight, bias)


def _conv_as_linear(conv: nn.Conv1d) -> torch.Tensor:
    """A kernel-2 Conv1d's weight [out, in, 2] as a linear weight [out, 2*in] over `_pairs` (previous tap
    first), rebuilt only when the weight changes (a load, a training step)."""
    w = conv._parameters["weight"]
    key = (w.data_ptr(), w._version, w.dtype, w.device)
    cached = getattr(conv, "_as_linear", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, w.detach().permute(0, 2, 1).reshape(w.shape[0], -1).clone())
        conv._as_linear = cached
    return cached[1]


# ----------------------------------------------------------------------------------------------- attention


def _check_input(x: torch.Tensor, hidden_size: int, who: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{who}: input has shape {tuple(x.shape)}: expected [batch, seq, hidden_size]")
    if x.shape[-1] != hidden_size:
        raise ValueError(
            f"{who}: input last dim = {x.shape[-1]}: expected hidden_size ({hidden_size}); "
            f"input shape {tuple(x.shape)}"
        )


def _linear_weights(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of an nn.Linear by dict lookups: `linear.weight` misses the instance __dict__ and goes
    through nn.Module.__getattr__ (an AttributeError formatted and caught, ~5k instructions; per decode step)."""
    params = linear._parameters
    return params["weight"], params["bias"]


def _linear(d_in: int, d_out: int, std: float) -> nn.Linear:
    lin = nn.Linear(d_in, d_out, bias=False)
    nn.init.normal_(lin.weight, std=std)
    return lin


@dataclass(frozen=True, eq=False)
class DocumentMask:
    """Rows packed with several documents (full-sequence forward only): a query attends the keys of its own
    document up to itself (the HF code's reset_attention_mask), optionally with positions restarting per document.
    Built once per forward from the batch's document ids, read by every layer."""

    mask_b1ss: torch.Tensor  # [B, 1, S, S] bool: query i sees key j iff j <= i and both are in the same document
    positions_bs: torch.Tensor | None  # [B, S] long rope positions; None = 0..S-1 in every row
    table_len: int  # rotary table rows needed: max(S, the largest position + 1)

    @classmethod
    def build(cls, documents_bs: torch.Tensor, positions_bs: torch.Tensor | None = None) -> DocumentMask:
        if documents_bs.dim() != 2:
            raise ValueError(f"documents has shape {list(documents_bs.shape)}: expected [batch, seq]")
        if positions_bs is not None and positions_bs.shape != documents_bs.shape:
            raise ValueError(f"positions has shape {list(positions_bs.shape)}: expected the documents' "
                             f"{list(documents_bs.shape)}")
        s = documents_bs.shape[1]
        causal_ss = torch.ones(s, s, dtype=torch.bool, device=documents_bs.device).tril()
        same_bss = documents_bs[:, :, None] == documents_bs[:, None, :]
        table_len = s
        if positions_bs is not None:
            lo, hi = (int(v) for v in positions_bs.aminmax())  # one sync per forward, not per layer
            if lo < 0:
                raise ValueError(f"positions: {lo} is negative; expected positions >= 0")
            table_len = max(s, hi + 1)
        return cls((same_bss & causal_ss)[:, None], positions_bs, table_len)


def _causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: RotaryCache, rotary_dim: int,
    docs: DocumentMask | None = None,
) -> torch.Tensor:
    """q, k, v [B, H, S, Dh] -> [B, S, H*Dh]: partial rope on q and k, causal softmax(q k^T / sqrt(Dh)) v
    (with `docs`: within each document, at its positions)."""
    b, h, s, dh = q.shape
    cos, sin = rotary(s if docs is None else docs.table_len, q.device)
    if docs is not None and docs.positions_bs is not None:
        q = apply_partial_rope_at(q, cos, sin, docs.positions_bs, rotary_dim)
        k = apply_partial_rope_at(k, cos, sin, docs.positions_bs, rotary_dim)
    else:
        q = apply_partial_rope(q, cos, sin, rotary_dim)
        k = apply_partial_rope(k, cos, sin, rotary_dim)
    if docs is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=dh**-0.5)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=docs.mask_b1ss, scale=dh**-0.5)
    return out.transpose(1, 2).reshape(b, s, h * dh)


def _cached_causal_attention(
    qk: torch.Tensor,
    v: torch.Tensor,
    rotary: RotaryCache,
    rotary_dim: int,
    cache: LayerKVCache,
    step: CacheStep,
    interleaved: bool,
) -> torch.Tensor:
    """`_causal_attention` for new tokens continuing cached rows: rope at each row's positions, keys/values
    appended to the cache, each query attends the row's cached keys and the new ones up to itself.

    qk [B, 2H, S, Dh]: queries and keys together, rotated in one pass (a decode step is per-op overhead, not
    arithmetic), heads q0..q(H-1) then k0..k(H-1), or `interleaved` q0, k0, q1, k1, ... (LFA's per-head layout,
    a view of its projection: no copy); v [B, H, S, Dh]."""
    b, h, s, dh = v.shape
    if rotary_dim and s == 1 and qk.dtype == torch.float32:
        cos_b11d, rot_b1dd = _step_rope_matrices(rotary, step, dh, qk.device)
        qk = qk * cos_b11d + qk @ rot_b1dd  # a fresh contiguous [B, 2H, 1, Dh]
        # q and k as strided views: the tensors the slicing below gives (same sizes and strides), minus
        # __getitem__'s parsing (a decode step is per-op overhead)
        step_h, k_off = (2 * dh, dh) if interleaved else (dh, h * dh)
        q = qk.as_strided((b, h, 1, dh), (2 * h * dh, step_h, dh, 1), qk.storage_offset())
        k = qk.as_strided((b, h, 1, dh), (2 * h * dh, step_h, dh, 1), qk.storage_offset() + k_off)
    else:
        if rotary_dim:
            cos_b1sr, sin_b1sr = _step_rope_rows(rotary, step, qk.device)
            qk = _rotate(qk, cos_b1sr, sin_b1sr, rotary_dim)
        q, k = (qk[:, 0::2], qk[:, 1::2]) if interleaved else (qk[:, :h], qk[:, h:])
    keys, values = cache.append(k, v, step)
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=step.key_mask_b1sl, is_causal=step.causal, scale=dh**-0.5
    )
    return out.reshape(b, 1, h * dh) if s == 1 else out.transpose(1, 2).reshape(b, s, h * dh)


def _step_rope_rows(rotary: RotaryCache, step: CacheStep, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin rows [B, 1, S, r] at the step's positions, gathered once per step: every layer's table is the same
    function of (rotary_dim, base, mode), so the layers share the rows."""
    key = (rotary.rotary_dim, rotary.base, rotary.mode, device)
    rows = step.rope_rows.get(key)
    if rows is None:
        cos, sin = rotary(step.table_len, device)
        rows = step.rope_rows[key] = (cos[step.positions_bs].unsqueeze(1), sin[step.positions_bs].unsqueeze(1))
    return rows


def _step_rope_matrices(
    rotary: RotaryCache, step: CacheStep, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation of a one-token step as x * C + x @ M, 3 ops instead of rotate-half's ~10 (a decode step is
    per-op overhead). C [B, 1, 1, Dh]: cos on the rotary channels, 1 on the others; M [B, 1, Dh, Dh] (or [Dh, Dh]
    when the rows share a position): column j holds only the signed sin of channel j, at row perm(j) (rotate-half's
    partner); zero columns past rotary_dim. Bit for bit `_rotate`: each output of x @ M is ONE product (the x*0
    terms add exact zeros), -x*sin == x*(-sin), and x*1 + 0 == x. Built once per step, shared by the layers."""
    key = ("matrices", rotary.rotary_dim, rotary.base, rotary.mode, head_dim, device)
    rows = step.rope_rows.get(key)
    if rows is None:
        cos_ld, signed_ld, partner_dd = _full_width_tables(rotary, step.table_len, head_dim, device)
        if step.positions_bs.shape[0] == 1:  # every row at one position: rows by narrow, M is 2-D
            lo = int(step.start[0])
            rows = (cos_ld.narrow(0, lo, 1).view(1, 1, 1, head_dim), partner_dd * signed_ld.narrow(0, lo, 1))
        else:
            pos_b = step.positions_bs[:, 0]
            n = pos_b.shape[0]
            rows = (cos_ld[pos_b].view(n, 1, 1, head_dim), (partner_dd * signed_ld[pos_b][:, None, :])[:, None])
        step.rope_rows[key] = rows
    return rows


def _full_width_tables(
    rotary: RotaryCache, table_len: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C [L, Dh]: cos, then ones past rotary_dim; S [L, Dh]: rotate-half's signed sin (-sin on the first half,
    +sin on the second), zeros past rotary_dim; P [Dh, Dh] 0/1: P[k, j] = 1 iff k is channel j's partner), built
    from the rotary tables and kept on the RotaryCache until those tables change."""
    cached = rotary.__dict__.get("_full_width")
    full_cos = rotary._buffers["cos_cached"]
    if cached is not None and cached[0] == (full_cos.data_ptr(), head_dim, device) and cached[1].shape[0] >= table_len:
        return cached[1], cached[2], cached[3]
    rotary(table_len, device)  # (re)builds the float32 tables when too short, moved or cast
    full_cos, full_sin = rotary.cos_cached, rotary.sin_cached
    key = (full_cos.data_ptr(), head_dim, device)
    if cached is None or cached[0] != key:
        r, half = rotary.rotary_dim, rotary.rotary_dim // 2
        n = full_cos.shape[0]
        with torch.inference_mode(False):  # normal tensors: usable by later no_grad forwards too
            cos_ld = torch.ones(n, head_dim, dtype=full_cos.dtype, device=device)
            cos_ld[:, :r] = full_cos
            signed_ld = torch.zeros(n, head_dim, dtype=full_sin.dtype, device=device)
            signed_ld[:, :half] = -full_sin[:, :half]
            signed_ld[:, half:r] = full_sin[:, half:]
            partner_dd = torch.zeros(head_dim, head_dim, dtype=full_sin.dtype, device=device)
            j = torch.arange(r, device=device)
            partner_dd[(j + half) % r, j] = 1.0
        cached = rotary.__dict__["_full_width"] = (key, cos_ld, signed_ld, partner_dd)
    return cached[1], cached[2], cached[3]


def _check_cache_args(cache: LayerKVCache | None, step: CacheStep | None, who: str,
                      docs: DocumentMask | None = None) -> None:  # fmt: skip
    if (cache is None) != (step is None):
        raise ValueError(f"{who}: a cached forward needs both the layer cache and the step (got one of them)")
    if docs is not None and cache is not None:
        raise ValueError(f"{who}: document masks are for a full-sequence forward, not a cached one")


class LFAAttention(nn.Module):
    """Localized Filtering-based Attention (Yuan 2.0-M32). forward(x [B, S, d]) -> [B, S, d].

    v_proj: d -> H*Dh from x; qk_proj: d -> 2*H*Dh from the filtered u, laid out per head as [q (Dh) | k (Dh)]
    (the released HF q_proj/k_proj are the two halves of this per-head layout, not the first/second half
    of the whole matrix); o_proj: H*Dh -> d. No biases.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.hidden_size, self.num_heads, self.head_dim, self.rotary_dim = d, h, dh, cfg.rotary_dim
        self.lfa = LocalizedFilter(d, cfg.norm_eps, cfg.init_std)
        self.v_proj = _linear(d, h * dh, cfg.init_std)
        self.qk_proj = _linear(d, 2 * h * dh, cfg.init_std)
        self.o_proj = _linear(h * dh, d, cfg.init_std)
        self.rotary = RotaryCache(cfg.rotary_dim, cfg.rope_base, cfg.max_seq_len, cfg.rope)

    def forward(
        self, x: torch.Tensor, cache: LayerKVCache | None = None, step: CacheStep | None = None,
        docs: DocumentMask | None = None,
    ) -> torch.Tensor:
        """Without a cache: the whole sequence (`docs`: packed documents; the filter is not reset at a boundary,
        as in the HF training forward). With (cache, step): new tokens continuing the cached rows; the cache gets
        their keys, values and LFA inputs."""
        _check_input(x, self.hidden_size, "LFAAttention")
        _check_cache_args(cache, step, "LFAAttention", docs)
        b, s, _ = x.shape
        h, dh = self.num_heads, self.head_dim
        if cache is not None:  # [B, 2H, S, Dh] views: heads q0, k0, q1, k1, ...; at S = 1 one view each
            # the projections as F.linear on their weights (nn.Linear's own forward, minus a module call each);
            # submodules and weights by dict (an nn.Module attribute miss costs ~5k instructions, per step)
            mods = self._modules
            v = F.linear(x, *_linear_weights(mods["v_proj"]))
            v = v.view(b, h, 1, dh) if s == 1 else v.view(b, s, h, dh).transpose(1, 2)
            u, cache.lfa_inputs_b2d = mods["lfa"].forward_cached(x, cache.lfa_inputs_b2d, step)
            qk = F.linear(u, *_linear_weights(mods["qk_proj"]))
            qk_b2hsd = qk.view(b, 2 * h, 1, dh) if s == 1 else qk.view(b, s, 2 * h, dh).transpose(1, 2)
            out = _cached_causal_attention(qk_b2hsd, v, mods["rotary"], self.rotary_dim, cache, step,
                                           interleaved=True)
            return F.linear(out, *_linear_weights(mods["o_proj"]))
        v = self.v_proj(x).view(b, s, h, dh).transpose(1, 2)
        qk = self.qk_proj(self.lfa(x)).view(b, s, h, 2 * dh)
        q, k = (t.transpose(1, 2) for t in qk.split(dh, dim=-1))  # per head: first Dh = q, last Dh = k
        return self.o_proj(_causal_attention(q, k, v, self.rotary, self.rotary_dim, docs))


class CausalSelfAttention(nn.Module):
    """Plain causal multi-head attention (cfg.lfa = False): q, k, v all projected from x. Same rope and scale."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.hidden_size, self.num_heads, self.head_dim, self.rotary_dim = d, h, dh, cfg.rotary_dim
        self.q_proj = _linear(d, h * dh, cfg.init_std)
        self.k_proj = _linear(d, h * dh, cfg.init_std)
        self.v_proj = _linear(d, h * dh, cfg.init_std)
        self.o_proj = _linear(h * dh, d, cfg.init_std)
        self.rotary = RotaryCache(cfg.rotary_dim, cfg.rope_base, cfg.max_seq_len, cfg.rope)

    def forward(
        self, x: torch.Tensor, cache: LayerKVCache | None = None, step: CacheStep | None = None,
        docs: DocumentMask | None = None,
    ) -> torch.Tensor:
        """Like LFAAttention.forward (the cache holds keys and values only)."""
        _check_input(x, self.hidden_size, "CausalSelfAttention")
        _check_cache_args(cache, step, "CausalSelfAttention", docs)
        b, s, _ = x.shape
        h, dh = self.num_heads, self.head_dim
        q, k, v = (p(x).view(b, s, h, dh).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if cache is None:
            return self.o_proj(_causal_attention(q, k, v, self.rotary, self.rotary_dim, docs))
        return self.o_proj(_cached_causal_attention(torch.cat((q, k), dim=1), v, self.rotary, self.rotary_dim,
                                                    cache, step, interleaved=False))


def build_attention(cfg: ModelConfig) -> nn.Module:
    """LFAAttention when cfg.lfa, else CausalSelfAttention."""
    return LFAAttention(cfg) if cfg.lfa else CausalSelfAttention(cfg)


# ----------------------------------------------------------------------------------------------- decoding caches

CACHE_CHUNK = 256  # cache capacity grows (doubling) in multiples of this many positions


@dataclass(frozen=True, eq=False)
class CacheStep:
    """Where the S token columns of one cached forward sit in each row; built once per forward, read by every layer.

    Rows are right-padded: row b has num_new[b] real tokens in columns [0, num_new[b]), at positions start[b] +
    column, where start[b] is the row's cached length (every sequence's positions start at 0 at its first token).
    Padding columns come after a row's real tokens, so no real token sees one (causal attention, causal filter);
    they are never written to the cache and never sent to the MoE. When every row starts at the same position
    with no padding (batch-1 decoding, equal prompts) the step takes cheaper paths: slice writes, no gathers, and
    no attention mask for one-token steps or a plain causal one for a prefill.
    """

    start: tuple[int, ...]  # tokens already cached per row
    num_new: tuple[int, ...]  # real new tokens per row
    seq_len: int  # S
    positions_bs: torch.Tensor  # [B, S] long: start + column ([1, S] when all rows start together)
    key_mask_b1sl: torch.Tensor | None  # [B, 1, S, L] bool: query column i of row b sees slot j iff j <= start + i
    causal: bool  # no mask but SDPA's is_causal: every row starts at 0, no padding (then L == S)
    writes_n: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (row, slot, column) of each real new
    #   token; None: all rows write columns 0..S-1 to slots start[0]..start[0]+S-1
    valid_index_n: torch.Tensor | None  # the real tokens among the B*S flattened columns; None: no padding
    last_index_b: torch.Tensor | None  # each row's last real token among the B*S columns; None: column S-1
    has_past_b11: torch.Tensor | None  # [B, 1, 1] bool: start > 0; None when true for every row
    lfa_tail_b2: torch.Tensor | None  # [B, 2]: num_new + (0, 1), the last two real filter inputs; None: no padding
    key_len: int  # L = max(start + num_new): the cache prefix the attention reads
    table_len: int  # rotary table rows needed: max(start) + S
    rope_rows: dict = field(default_factory=dict, repr=False)  # cos/sin rows at positions_bs, filled by layer 0

    @property
    def padded(self) -> bool:
        return self.valid_index_n is not None

    @classmethod
    def build(
        cls, start: Sequence[int], num_new: Sequence[int], seq_len: int, device: torch.device | str
    ) -> CacheStep:
        start, num_new = tuple(int(s) for s in start), tuple(int(n) for n in num_new)
        b = len(start)
        if seq_len == 1 and start[0] > 0 and start.count(start[0]) == b and num_new.count(1) == b:
            # one token per row, all rows at one position (batch-1 decode): what the general path below gives,
            # without its tensor work
            p = start[0]
            positions_11 = torch.full((1, 1), p, dtype=torch.long, device=device)  # one call, not arange + view
            return cls(start, num_new, 1, positions_11, None, False, None, None, None, None, None, p + 1, p + 1)
        padded = any(n != seq_len for n in num_new)
        key_len = max(s + n for s, n in zip(start, num_new))
        cols_s = torch.arange(seq_len)

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        if not padded and len(set(start)) == 1:
            positions = start[0] + cols_s[None]  # [1, S]
            causal, writes, mask = start[0] == 0 and seq_len > 1, None, None
            if start[0] > 0 and seq_len > 1:  # a chunk continuing the cache: causal, shifted by start
                mask = dev((torch.arange(key_len) <= positions[0, :, None])[None, None])
        else:
            num_b = torch.tensor(num_new)
            positions = torch.tensor(start)[:, None] + cols_s
            causal = False
            mask = dev(torch.arange(key_len)[None, None, None, :] <= positions[:, None, :, None])
            rows_n, cols_n = (cols_s[None, :] < num_b[:, None]).nonzero(as_tuple=True)
            writes = (dev(rows_n), dev(positions[rows_n, cols_n]), dev(cols_n))
        valid = last = tail = None
        if padded:
            valid_bs = cols_s[None, :] < torch.tensor(num_new)[:, None]
            valid = dev(valid_bs.flatten().nonzero()[:, 0])
            last = dev(torch.tensor([i * seq_len + n - 1 for i, n in enumerate(num_new)]))
            tail = dev(torch.tensor([[n, n + 1] for n in num_new]))
        has_past = None if min(start) > 0 else dev(torch.tensor([s > 0 for s in start]).view(b, 1, 1))
        return cls(start, num_new, seq_len, dev(positions), mask, causal, writes, valid, last, has_past, tail,
                   key_len, max(start) + seq_len)


@dataclass(eq=False)
class LayerKVCache:
    """One layer's decoding state for B rows: keys (after rope) and values in slots 0..length-1 of each row, and
    for LFA the layer's last two filter inputs per row (zeros before a sequence's first token)."""

    k_bhcd: torch.Tensor  # [B, H, capacity, Dh]
    v_bhcd: torch.Tensor
    lfa_inputs_b2d: torch.Tensor | None  # [B, 2, d]; None for plain causal attention

    def append(
        self, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor, step: CacheStep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the real new tokens' keys/values at their positions; return the first key_len slots (views)."""
        if step.writes_n is None:  # narrow + copy_: the slice assignment's copy without its indexing overhead
            lo = step.start[0]
            self.k_bhcd.narrow(2, lo, step.seq_len).copy_(k_bhsd)
            self.v_bhcd.narrow(2, lo, step.seq_len).copy_(v_bhsd)
        else:
            rows, slots, cols = step.writes_n
            self.k_bhcd[rows, :, slots] = k_bhsd[rows, :, cols]
            self.v_bhcd[rows, :, slots] = v_bhsd[rows, :, cols]
        return self.k_bhcd.narrow(2, 0, step.key_len), self.v_bhcd.narrow(2, 0, step.key_len)

    def rows(self, idx_n: torch.Tensor) -> LayerKVCache:
        lfa = None if self.lfa_inputs_b2d is None else self.lfa_inputs_b2d.index_select(0, idx_n)
        return LayerKVCache(self.k_bhcd.index_select(0, idx_n), self.v_bhcd.index_select(0, idx_n), lfa)

    def reserve(self, capacity: int) -> None:
        """At least `capacity` slots per row (in place: holders of this layer cache keep a valid one)."""
        self.k_bhcd, self.v_bhcd = _grown(self.k_bhcd, capacity), _grown(self.v_bhcd, capacity)


def _grown(t_bhcd: torch.Tensor, capacity: int) -> torch.Tensor:
    if t_bhcd.shape[2] >= capacity:
        return t_bhcd
    out = t_bhcd.new_zeros((*t_bhcd.shape[:2], capacity, t_bhcd.shape[3]))  # zeros: masked slots stay finite
    out[:, :, : t_bhcd.shape[2]] = t_bhcd
    return out


@dataclass(eq=False)
class KVCache:
    """The decoding state of B sequences (rows) in every layer, plus each row's length (shared by the layers).

    A cached forward (`MoETransformer.forward(tokens, cache=...)`) appends in place. Rows are independent:
    `select` drops finished ones and `concat` adds newly prefilled ones between steps (continuous batching); both
    copy the cache once, decode steps never do. Slots at or past a row's length are masked out (they hold zeros
    or stale finite values).
    """

    layers: list[LayerKVCache]
    lengths: list[int]  # tokens cached per row = the position of the row's next token
    max_len: int  # the model's max_seq_len: no row grows past it

    @classmethod
    def allocate(
        cls,
        cfg: ModelConfig,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """Empty rows with room for `capacity` positions each (capped at cfg.max_seq_len; grows on demand)."""
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size}: expected at least 1 row")
        capacity = max(1, min(capacity, cfg.max_seq_len))
        shape = (batch_size, cfg.num_heads, capacity, cfg.head_dim)

        def layer() -> LayerKVCache:
            lfa = torch.zeros(batch_size, 2, cfg.hidden_size, dtype=dtype, device=device) if cfg.lfa else None
            return LayerKVCache(torch.zeros(shape, dtype=dtype, device=device),
                                torch.zeros(shape, dtype=dtype, device=device), lfa)

        return cls([layer() for _ in range(cfg.num_layers)], [0] * batch_size, cfg.max_seq_len)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.layers[0].k_bhcd.shape[2]

    def begin(self, num_new: Sequence[int], seq_len: int, device: torch.device | str) -> CacheStep:
        """Check that each row can take its num_new[b] new tokens, make room, and describe the step."""
        num_new = [int(n) for n in num_new]
        if len(num_new) != self.batch_size:
            raise ValueError(f"num_new has {len(num_new)} counts: expected {self.batch_size} (one per cache row)")
        if any(not 1 <= n <= seq_len for n in num_new):
            raise ValueError(f"num_new = {num_new}: each must be in [1, {seq_len}] (the token columns)")
        total = [length + n for length, n in zip(self.lengths, num_new)]
        if max(total) > self.max_len:
            row = total.index(max(total))
            raise ValueError(f"row {row} would hold {total[row]} tokens: exceeds max_seq_len {self.max_len}")
        self.reserve(max(total))
        return CacheStep.build(self.lengths, num_new, seq_len, device)

    def advance(self, step: CacheStep) -> None:
        """Count the step's tokens as cached (after every layer has appended them)."""
        self.lengths = [length + n for length, n in zip(self.lengths, step.num_new)]

    def reserve(self, length: int) -> None:
        """Room for `length` positions per row: capacity doubles, in CACHE_CHUNK multiples, up to max_len."""
        if length <= self.capacity:
            return
        grown = -(-max(length, 2 * self.capacity) // CACHE_CHUNK) * CACHE_CHUNK
        capacity = max(length, min(grown, self.max_len))
        for layer in self.layers:
            layer.reserve(capacity)

    def select(self, rows: Sequence[int]) -> KVCache:
        """A cache of these rows, in this order (e.g. the sequences still running)."""
        rows = [int(r) for r in rows]
        if not rows:
            raise ValueError("select: expected at least one row")
        if min(rows) < 0 or max(rows) >= self.batch_size:
            raise ValueError(f"rows = {rows}: the cache has rows 0..{self.batch_size - 1}")
        idx = torch.tensor(rows, dtype=torch.long, device=self.layers[0].k_bhcd.device)
        return KVCache([layer.rows(idx) for layer in self.layers], [self.lengths[r] for r in rows], self.max_len)

    @staticmethod
    def concat(caches: Sequence[KVCache]) -> KVCache:
        """The rows of all caches, in order (e.g. the running batch, then newly prefilled requests)."""
        if not caches:
            raise ValueError("concat: expected at least one cache")
        first = caches[0]
        for c in caches[1:]:
            if (len(c.layers), c.max_len, c.layers[0].lfa_inputs_b2d is None) != (
                len(first.layers), first.max_len, first.layers[0].lfa_inputs_b2d is None
            ):
                raise ValueError("concat: the caches come from different model configurations")
        capacity = max(c.capacity for c in caches)
        layers = []
        for i in range(len(first.layers)):
            parts = [c.layers[i] for c in caches]
            lfa = None if parts[0].lfa_inputs_b2d is None else torch.cat([p.lfa_inputs_b2d for p in parts])
            layers.append(LayerKVCache(torch.cat([_grown(p.k_bhcd, capacity) for p in parts]),
                                       torch.cat([_grown(p.v_bhcd, capacity) for p in parts]), lfa))
        return KVCache(layers, [n for c in caches for n in c.lengths], first.max_len)
