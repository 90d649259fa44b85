"""Parameter and FLOP counts from a ModelConfig, without building a model.

Reproduces the Yuan 2.0-M32 paper exactly (shared yuan-m32.md, "Counting"): 39.94e9 total, 3.704e9 active,
7.41 GFLOPs forward per token (2 * active, the paper's "2N" convention, which leaves attention scores out).

Per decoder layer (d = hidden, W = heads * head_dim, E = experts, F = ffn inner size):
- attention, LFA on:  V d*W + QK d*2W (fused, per head [q | k]) + O W*d                   = 4*d*W
  attention, LFA off: Q, K, V, O                                                            = 4*d*W
- LFA filter (only when cfg.lfa): conv1 d -> d/2, kernel 2, bias: 2*d*(d/2) + d/2;
  conv2 d/2 -> d, kernel 2, bias: 2*(d/2)*d + d; its own RMSNorm: d
- router: attention router Wq, Wk, Wv in R^{E x d}: 3*E*d; linear router: E*d
- two RMSNorms: 2*d
- one SwiGLU expert: w1 d*2F + w2 F*d = 3*d*F (no biases); E of them per layer, top_k active per token
Model: layers + embedding vocab*d (tied with the LM head, counted once) + final RMSNorm d.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moe_runtime.config import ModelConfig


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts. `breakdown` holds per-layer items (``*_per_layer``, ``expert``) and whole-model totals
    per component (``attention``, ``lfa``, ``router``, ``norms``, ``experts``, ``embedding``, ``final_norm``)."""

    total_params: int
    active_params: int
    breakdown: dict[str, int] = field(hash=False)

    @property
    def expert_params(self) -> int:
        return self.breakdown["expert"]

    @property
    def layer_params(self) -> int:
        return self.breakdown["layer"]

    @property
    def dense_params_per_layer(self) -> int:
        """Everything in a layer except the experts (all of it active for every token)."""
        return self.breakdown["dense_per_layer"]


# What an expert actor holds per expert: fp32 weights + AdamW exp_avg + exp_avg_sq (the bytes a migration moves).
EXPERT_STATE_BYTES_PER_PARAM = 12


def expert_param_count(cfg: ModelConfig) -> int:
    """Parameters of one SwiGLU expert: w1 [d, 2f] + w2 [f, d]."""
    return 3 * cfg.hidden_size * cfg.ffn_hidden_size


def expert_state_bytes(cfg: ModelConfig) -> int:
    """Bytes of one expert's state on its actor (weights and AdamW moments, fp32): what moving one copy costs."""
    return expert_param_count(cfg) * EXPERT_STATE_BYTES_PER_PARAM


def count_params(cfg: ModelConfig) -> ModelCounts:
    d = cfg.hidden_size
    w = cfg.num_heads * cfg.head_dim
    e = cfg.num_experts
    f = cfg.ffn_hidden_size
    n_layers = cfg.num_layers

    if cfg.lfa:
        attention = d * w + d * 2 * w + w * d  # V, fused QK, O (yuan-m32.md)
        h = d // 2
        lfa = (2 * d * h + h) + (2 * h * d + d) + d  # conv1 + conv2 (kernel 2, biases) + LFA RMSNorm
    else:
        attention = 4 * d * w  # Q, K, V, O
        lfa = 0
    router = 3 * e * d if cfg.router == "attention" else e * d
    norms = 2 * d
    expert = d * 2 * f + f * d
    dense = attention + lfa + router + norms
    layer = dense + e * expert
    embedding = cfg.vocab_size * d
    final_norm = d

    total = n_layers * layer + embedding + final_norm
    active = n_layers * (dense + cfg.top_k * expert) + embedding + final_norm
    breakdown = {
        "attention_per_layer": attention,
        "lfa_per_layer": lfa,
        "router_per_layer": router,
        "norms_per_layer": norms,
        "expert": expert,
        "experts_per_layer": e * expert,
        "active_experts_per_layer": cfg.top_k * expert,
        "dense_per_layer": dense,
        "layer": layer,
        "attention": n_layers * attention,
        "lfa": n_layers * lfa,
        "router": n_layers * router,
        "norms": n_layers * norms,
        "experts": n_layers * e * expert,
        "embedding": embedding,
        "final_norm": final_norm,
    }
    return ModelCounts(total_params=total, active_params=active, breakdown=breakdown)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, int]:
    """FLOPs per token (1 multiply-add = 2 FLOPs).

    - ``forward_flops_per_token`` = 2 * active params (paper convention: matmuls with weights only);
      ``training_flops_per_token`` = 6 * active (forward + backward 2x).
    - ``attention_score_flops_per_token``: QK^T and AV for a full (non-causal) sequence of `seq_len`:
      2 matmuls * 2 FLOPs * seq_len * W per layer = 4 * layers * seq_len * W;
      ``attention_score_flops_per_token_causal``: the causal average, half of that.
    - ``router_flops_per_token``: attention router 2*(3*E*d) projections + 2*2*E*E scores and mixing per layer;
      linear router 2*E*d per layer. The projection part is already inside 2*active; the E^2 part
      (``router_mixing_flops_per_token``) is not, and is negligible (98,304 FLOPs per token for M32).
    - ``forward_flops_per_token_full`` = 2 * active + causal attention scores;
      ``training_flops_per_token_full`` = 3 times that.
    """
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    if seq_len <= 0:
        raise ValueError(f"seq_len = {seq_len}: must be > 0")
    counts = count_params(cfg)
    d, e, n_layers = cfg.hidden_size, cfg.num_experts, cfg.num_layers
    w = cfg.num_heads * cfg.head_dim
    fwd = 2 * counts.active_params
    scores = 4 * n_layers * seq_len * w
    scores_causal = scores // 2
    if cfg.router == "attention":
        mixing = n_layers * (2 * 2 * e * e)
        router = n_layers * (2 * 3 * e * d) + mixing
    else:
        mixing = 0
        router = n_layers * (2 * e * d)
    return {
        "forward_flops_per_token": fwd,
        "training_flops_per_token": 3 * fwd,
        "attention_score_flops_per_token": scores,
        "attention_score_flops_per_token_causal": scores_causal,
        "router_flops_per_token": router,
        "router_mixing_flops_per_token": mixing,
        "forward_flops_per_token_full": fwd + scores_causal,
        "training_flops_per_token_full": 3 * (fwd + scores_causal),
    }


def flops_report(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    """One flat JSON-able dict: config summary, parameter counts (``params_<item>`` for the breakdown), FLOPs."""
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    counts = count_params(cfg)
    report: dict[str, Any] = {
        "preset": cfg.preset,
        "seq_len": seq_len,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "router": cfg.router,
        "lfa": cfg.lfa,
        "vocab_size": cfg.vocab_size,
        "total_params": counts.total_params,
        "active_params": counts.active_params,
        "active_fraction": counts.active_params / counts.total_params,
    }
    report.update(flops_per_token(cfg, seq_len))
    report.update({f"params_{k}": v for k, v in counts.breakdown.items()})
    return report


_COUNT_UNITS = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))
_FLOP_UNITS = ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "KFLOP"))


def format_count(n: float) -> str:
    """39942842368 -> '39.94 B' (B = billion, as in the paper); below 1000 the plain number."""
    for scale, unit in _COUNT_UNITS:
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g}" if not isinstance(n, int) else str(n)


def format_flops(x: float) -> str:
    """7408111616 -> '7.41 GFLOP'."""
    if not math.isfinite(x):
        return f"{x} FLOP"
    for scale, unit in _FLOP_UNITS:
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:g} FLOP"


def flops_table_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of a report for a two-column rich table."""
    r = report
    model = (
        f"{r['preset'] or 'custom'}: {r['num_layers']} layers, d={r['hidden_size']}, "
        f"{r['num_experts']} experts top-{r['top_k']}, {r['router']} router, "
        f"{'LFA' if r['lfa'] else 'plain'} attention"
    )
    rows = [
        ("model", model),
        ("total parameters", format_count(r["total_params"])),
        ("active parameters", f"{format_count(r['active_params'])} ({100 * r['active_fraction']:.1f}%)"),
        ("  experts", format_count(r["params_experts"])),
        ("  attention", format_count(r["params_attention"])),
        ("  LFA filter", format_count(r["params_lfa"])),
        ("  router", format_count(r["params_router"])),
        ("  norms", format_count(r["params_norms"] + r["params_final_norm"])),
        ("  embedding (tied)", format_count(r["params_embedding"])),
        ("one expert", format_count(r["params_expert"])),
        ("forward FLOPs/token (2N)", format_flops(r["forward_flops_per_token"])),
        ("training FLOPs/token (6N)", format_flops(r["training_flops_per_token"])),
        (
            f"attention scores/token (seq {r['seq_len']}, causal)",
            format_flops(r["attention_score_flops_per_token_causal"]),
        ),
        (
            f"attention scores/token (seq {r['seq_len']}, full)",
            format_flops(r["attention_score_flops_per_token"]),
        ),
        ("router FLOPs/token", format_flops(r["router_flops_per_token"])),
        ("forward FLOPs/token (full)", format_flops(r["forward_flops_per_token_full"])),
        ("training FLOPs/token (full)", format_flops(r["training_flops_per_token_full"])),
    ]
    return rows
