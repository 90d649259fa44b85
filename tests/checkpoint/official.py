"""A small checkpoint in the official Yuan 2.0-M32 HF layout, and an independent float64 transcription of the
official forward (IEIT-Yuan/Yuan2.0-M32 `yuan_moe_hf_model.py`), written from the HF tensor names.

Nothing here imports moe_runtime: the names, shapes, the file layout and the forward are transcribed from the
official code (shared yuan-m32.md, "The released checkpoint"), so a loader bug cannot hide in a shared helper.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

# hidden 64 with 2 heads of 64 (projection 128 = 2 x hidden, as M32's 4096 = 2 x 2048): the HF class then rotates
# hidden // heads = 32 of each head's 64 channels, M32's "128 of 256".
TINY_HF_CONFIG: dict[str, Any] = {
    "architectures": ["YuanForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_yuan.YuanConfig",
                 "AutoModelForCausalLM": "yuan_hf_model.YuanForCausalLM"},
    "model_type": "yuan",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "attention_projection_size": 128,
    "vocab_size": 80,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "use_shareqk": False,
    "use_flash_attention": False,
    "causal_mask": True,
    "reset_attention_mask": True,
    "reset_position_ids": True,
    "eod_token": 77,
    "sep_token": 78,
    "pad_token_id": 79,
    "bos_token_id": 77,
    "eos_token_id": 77,
    "tie_word_embeddings": True,
    "use_cache": True,
    "torch_dtype": "bfloat16",
    "moe_config": {"moe_num_experts": 4, "moe_top_k": 2, "norm_topk_prob": True, "ffn_hidden_size": 32,
                   "gated_linear_unit": True},
}


def hf_config(**changes: Any) -> dict[str, Any]:
    cfg = json.loads(json.dumps(TINY_HF_CONFIG))
    moe = changes.pop("moe_config", {})
    cfg.update(changes)
    cfg["moe_config"].update(moe)
    return cfg


def official_tensors(cfg: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32,
                     lm_head: bool = False) -> dict[str, torch.Tensor]:
    """Random weights under the official names and shapes ([out, in]; Conv2d [out, in, 2, 1]), scaled so that
    activations stay O(1) and routing is far from ties."""
    g = torch.Generator().manual_seed(seed)
    d, v = cfg["hidden_size"], cfg["vocab_size"]
    width = cfg["attention_projection_size"]
    e, f = cfg["moe_config"]["moe_num_experts"], cfg["moe_config"]["ffn_hidden_size"]

    def lin(out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, inp, generator=g) / math.sqrt(inp)

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.2 * torch.randn(n, generator=g)

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(v, d, generator=g)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = norm(d)
        w[p + "self_attn.v_proj.weight"] = lin(width, d)
        w[p + "self_attn.q_proj.weight"] = lin(width, d)
        w[p + "self_attn.k_proj.weight"] = lin(width, d)
        w[p + "self_attn.o_proj.weight"] = lin(d, width)
        w[p + "self_attn.lf_gate.conv1.weight"] = torch.randn(d // 2, d, 2, 1, generator=g) / math.sqrt(2 * d)
        w[p + "self_attn.lf_gate.conv1.bias"] = 0.1 * torch.randn(d // 2, generator=g)
        w[p + "self_attn.lf_gate.conv2.weight"] = torch.randn(d, d // 2, 2, 1, generator=g) / math.sqrt(d)
        w[p + "self_attn.lf_gate.conv2.bias"] = 0.1 * torch.randn(d, generator=g)
        w[p + "self_attn.lf_gate.output_layernorm.weight"] = norm(d)
        w[p + "post_attention_layernorm.weight"] = norm(d)
        for name in ("query", "key", "value"):
            w[p + f"mlp.gate.{name}.weight"] = 2.0 * lin(e, d)
        for x in range(e):
            w[p + f"mlp.experts.{x}.w1.weight"] = lin(2 * f, d)
            w[p + f"mlp.experts.{x}.w2.weight"] = lin(d, f)
    w["model.norm.weight"] = norm(d)
    if lm_head:  # the converter writes the (tied) head too when Megatron had one
        w["lm_head.weight"] = w["model.embed_tokens.weight"].clone()
    return {k: t.to(dtype).contiguous() for k, t in w.items()}


def write_checkpoint(directory: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                     fmt: str = "safetensors", shards: int = 1) -> Path:
    """config.json + weights as HF saves them: one file (model.safetensors / pytorch_model.bin) or `shards` files
    with their index json (contiguous runs of tensors, so a layer's tensors and one expert's pair can straddle
    two shards)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    names = list(tensors)
    ext, stem, index = (("safetensors", "model", "model.safetensors.index.json") if fmt == "safetensors"
                        else ("bin", "pytorch_model", "pytorch_model.bin.index.json"))
    per = math.ceil(len(names) / shards)
    groups = [names[i:i + per] for i in range(0, len(names), per)]
    files = ([f"{stem}.{ext}"] if len(groups) == 1
             else [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.{ext}" for i in range(len(groups))])
    weight_map = {}
    for fname, group in zip(files, groups):
        chunk = {n: tensors[n] for n in group}
        if fmt == "safetensors":
            save_file(chunk, str(directory / fname), metadata={"format": "pt"})
        else:
            torch.save(chunk, directory / fname)
        weight_map.update({n: fname for n in group})
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (directory / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return directory


# ----------------------------------------------------------------------------------------------- the forward


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(dim: int, seq: int, mode: str, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 cos, sin [seq, dim]. "exact": the math in float64. "hf": `YuanRotaryEmbedding` as released:
    inv_freq rounded to bf16, a bf16 arange of positions, the angles and cos/sin in bf16."""
    if mode == "hf":
        inv_freq = (1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))).to(torch.bfloat16)
        t = torch.arange(seq, dtype=inv_freq.dtype)
        freqs = torch.einsum("i,j->ij", t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().double(), emb.sin().double()
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def official_forward(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], ids_bs: torch.Tensor,
                     rope: str = "exact") -> tuple[torch.Tensor, float]:
    """(logits [B, S, V] float64, the smallest gap between the k-th and (k+1)-th router probability).

    YuanForCausalLM without a cache on token ids that hold no eod token (so the reset masks change nothing)."""
    w = {k: t.double() for k, t in tensors.items()}
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("attention_projection_size", d) // heads
    rot = d // heads if head_dim != d // heads else head_dim
    eps, top_k = cfg["rms_norm_eps"], cfg["moe_config"]["moe_top_k"]
    b, s = ids_bs.shape
    cos, sin = rope_tables(rot, s, rope)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    min_gap = math.inf
    x = w["model.embed_tokens.weight"][ids_bs]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = _rms(x, w[p + "input_layernorm.weight"], eps)
        # YuanAttention: V from the layer input, Q and K from the LocalizedFiltering output
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(b, s, heads, head_dim).transpose(1, 2)
        inp = h.permute(0, 2, 1).unsqueeze(-1)  # [B, d, S, 1] as the official view/permute
        o1 = F.conv2d(inp, w[p + "self_attn.lf_gate.conv1.weight"], w[p + "self_attn.lf_gate.conv1.bias"],
                      padding=(1, 0))[:, :, :s]
        o2 = F.conv2d(o1, w[p + "self_attn.lf_gate.conv2.weight"], w[p + "self_attn.lf_gate.conv2.bias"],
                      padding=(1, 0))[:, :, :s]
        u = _rms(o2.squeeze(-1).permute(0, 2, 1) + h, w[p + "self_attn.lf_gate.output_layernorm.weight"], 1e-6)
        qk = torch.cat([u @ w[p + "self_attn.q_proj.weight"].T, u @ w[p + "self_attn.k_proj.weight"].T], dim=-1)
        q, k = torch.chunk(qk.view(b, s, heads, qk.shape[-1] // heads), 2, dim=-1)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = torch.cat((q[..., :rot] * cos + _rotate_half(q[..., :rot]) * sin, q[..., rot:]), dim=-1)
        k = torch.cat((k[..., :rot] * cos + _rotate_half(k[..., :rot]) * sin, k[..., rot:]), dim=-1)
        scores = (q @ k.transpose(2, 3)) / math.sqrt(head_dim)
        scores = scores.masked_fill(~causal, -math.inf)
        attn = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, heads * head_dim)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        # YuanMoeLayer: ParallelAttention_router, softmax over all experts, top-k, renormalise, SwiGLU experts
        t = _rms(x, w[p + "post_attention_layernorm.weight"], eps).reshape(b * s, d)
        qr, kr, vr = (t @ w[p + f"mlp.gate.{n}.weight"].T for n in ("query", "key", "value"))
        a = torch.softmax(qr.unsqueeze(-1) @ kr.unsqueeze(-2), dim=-1)  # [T, E, E]
        router_logits = (a @ vr.unsqueeze(-1)).squeeze(-1)
        probs = torch.softmax(router_logits, dim=-1)
        ranked = probs.sort(dim=-1, descending=True).values
        if ranked.shape[-1] > top_k:
            min_gap = min(min_gap, float((ranked[:, top_k - 1] - ranked[:, top_k]).min()))
        gates, chosen = torch.topk(probs, top_k, dim=-1)
        gates = gates / gates.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(t)
        for ti in range(t.shape[0]):
            for slot in range(top_k):
                ex = int(chosen[ti, slot])
                hidden = t[ti] @ w[p + f"mlp.experts.{ex}.w1.weight"].T
                a_half, g_half = torch.chunk(hidden, 2, dim=-1)
                out[ti] += gates[ti, slot] * ((F.silu(a_half) * g_half) @ w[p + f"mlp.experts.{ex}.w2.weight"].T)
        x = x + out.view(b, s, d)
    x = _rms(x, w["model.norm.weight"], eps)
    return x @ w["model.embed_tokens.weight"].T, min_gap  # tied head


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())
