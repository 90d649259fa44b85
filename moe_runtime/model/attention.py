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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_runtime.config import ModelConfig
from moe_runtime.model.norm import RMSNorm

# ----------------------------------------------------------------------------------------------- rotary


def rotary_tables(
    rotary_dim: int, seq_len: int, base: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [seq_len, rotary_dim] in float32 for positions 0..seq_len-1.

    inv_freq_i = base^(-2i/rotary_dim) for i < rotary_dim/2: the frequencies span the rotated part only (for
    Yuan-M32, 128 of the 256 head channels). Each frequency appears twice (NeoX layout: channel i and
    i + rotary_dim/2 form a pair). Everything is float32: the HF/vLLM Yuan code keeps inv_freq in bf16, which
    loses precision at long positions (see yuan-m32.md, pitfalls).
    """
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim = {rotary_dim}: must be even")
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim)
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # [S, r/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [S, r]
    return emb.cos(), emb.sin()


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
    compute = torch.promote_types(x.dtype, torch.float32)
    xr = x[..., :rotary_dim].to(compute)
    half = rotary_dim // 2
    rotated = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)  # rotate_half
    out = xr * cos[:seq_len].to(compute) + rotated * sin[:seq_len].to(compute)
    return torch.cat((out.to(x.dtype), x[..., rotary_dim:]), dim=-1)


class RotaryCache(nn.Module):
    """cos/sin tables cached as non-persistent buffers (not in state_dict) for positions < max_seq_len.

    Rebuilt on demand for a longer sequence, another device, or when a dtype cast of the module (e.g.
    `.to(torch.bfloat16)`) has touched the float32 tables.
    """

    def __init__(self, rotary_dim: int, base: float, max_seq_len: int):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.base = base
        cos, sin = rotary_tables(rotary_dim, max_seq_len, base)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos_cached
        if cos.shape[0] < seq_len or cos.device != device or cos.dtype != torch.float32:
            cos, sin = rotary_tables(self.rotary_dim, max(seq_len, cos.shape[0]), self.base, device)
            self.cos_cached, self.sin_cached = cos, sin
        return self.cos_cached[:seq_len], self.sin_cached[:seq_len]

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}, base={self.base}, cached={self.cos_cached.shape[0]}"


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


# ----------------------------------------------------------------------------------------------- attention


def _check_input(x: torch.Tensor, hidden_size: int, who: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{who}: input has shape {tuple(x.shape)}: expected [batch, seq, hidden_size]")
    if x.shape[-1] != hidden_size:
        raise ValueError(
            f"{who}: input last dim = {x.shape[-1]}: expected hidden_size ({hidden_size}); "
            f"input shape {tuple(x.shape)}"
        )


def _linear(d_in: int, d_out: int, std: float) -> nn.Linear:
    lin = nn.Linear(d_in, d_out, bias=False)
    nn.init.normal_(lin.weight, std=std)
    return lin


def _causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: RotaryCache, rotary_dim: int
) -> torch.Tensor:
    """q, k, v [B, H, S, Dh] -> [B, S, H*Dh]: partial rope on q and k, causal softmax(q k^T / sqrt(Dh)) v."""
    b, h, s, dh = q.shape
    cos, sin = rotary(s, q.device)
    q = apply_partial_rope(q, cos, sin, rotary_dim)
    k = apply_partial_rope(k, cos, sin, rotary_dim)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=dh**-0.5)
    return out.transpose(1, 2).reshape(b, s, h * dh)


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
        self.rotary = RotaryCache(cfg.rotary_dim, cfg.rope_base, cfg.max_seq_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.hidden_size, "LFAAttention")
        b, s, _ = x.shape
        h, dh = self.num_heads, self.head_dim
        v = self.v_proj(x).view(b, s, h, dh).transpose(1, 2)
        qk = self.qk_proj(self.lfa(x)).view(b, s, h, 2 * dh)
        q, k = (t.transpose(1, 2) for t in qk.split(dh, dim=-1))  # per head: first Dh = q, last Dh = k
        return self.o_proj(_causal_attention(q, k, v, self.rotary, self.rotary_dim))


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
        self.rotary = RotaryCache(cfg.rotary_dim, cfg.rope_base, cfg.max_seq_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.hidden_size, "CausalSelfAttention")
        b, s, _ = x.shape
        h, dh = self.num_heads, self.head_dim
        q, k, v = (p(x).view(b, s, h, dh).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(_causal_attention(q, k, v, self.rotary, self.rotary_dim))


def build_attention(cfg: ModelConfig) -> nn.Module:
    """LFAAttention when cfg.lfa, else CausalSelfAttention."""
    return LFAAttention(cfg) if cfg.lfa else CausalSelfAttention(cfg)
