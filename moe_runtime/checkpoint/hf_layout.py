"""The one table of rules between HF tensor names (official Yuan 2.0-M32 layout) and this model's state-dict keys.

HF tensors are `nn.Linear` weights [out, in] (y = x @ W.T) and Conv2d kernels [out, in, 2, 1]; see shared
yuan-m32.md, "The released checkpoint". Per layer L (D = head_dim, E = experts, f = ffn_hidden_size):

| this model                               | HF                                                  | rule      |
|------------------------------------------|-----------------------------------------------------|-----------|
| embed.weight                             | model.embed_tokens.weight                           | same      |
| layers.L.attn_norm.weight                | model.layers.L.input_layernorm.weight               | same      |
| layers.L.attn.v_proj.weight              | model.layers.L.self_attn.v_proj.weight              | same      |
| layers.L.attn.qk_proj.weight             | ...self_attn.q_proj.weight, ...self_attn.k_proj.weight | cat0   |
| layers.L.attn.o_proj.weight              | model.layers.L.self_attn.o_proj.weight              | same      |
| layers.L.attn.lfa.conv{1,2}.weight       | ...self_attn.lf_gate.conv{1,2}.weight [o, i, 2, 1]  | conv      |
| layers.L.attn.lfa.conv{1,2}.bias         | ...self_attn.lf_gate.conv{1,2}.bias                 | same      |
| layers.L.attn.lfa.norm.weight            | ...self_attn.lf_gate.output_layernorm.weight        | same      |
| layers.L.moe_norm.weight                 | model.layers.L.post_attention_layernorm.weight      | same      |
| layers.L.moe.router.wqkv [3E, d]         | ...mlp.gate.query/key/value.weight [E, d] each      | cat0      |
| layers.L.moe.dispatcher.experts.w1[e]    | ...mlp.experts.e.w1.weight [2f, d]                  | transpose |
| layers.L.moe.dispatcher.experts.w2[e]    | ...mlp.experts.e.w2.weight [d, f]                   | transpose |
| final_norm.weight                        | model.norm.weight                                   | same      |

qk_proj = cat([q_proj, k_proj], 0) keeps the per-head [q (D) | k (D)] layout the HF code reads back with a view to
[heads, 2D] and a chunk (a naive "first half = all queries" split would be wrong). The router's wqkv is chunked
q, k, v by AttentionRouter, the order of query, key, value here. Conv2d kernel [..., 0, 0] multiplies token t-1,
[..., 1, 0] token t: the Conv1d kernel [..., 0] / [..., 1] of LocalizedFilter.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from moe_runtime.config import ModelConfig
from moe_runtime.model.transformer import expert_param_name

RuleKind = Literal["same", "cat0", "conv", "transpose"]
Shape = tuple[int, ...]

# HF tensors a loader may find and must not use: the LM head duplicates the tied embedding (the converter writes
# it when Megatron had one); old HF saves carry the rotary frequencies as a buffer.
IGNORED_HF_TENSORS = (re.compile(r"lm_head\.weight"), re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\..*"))


@dataclass(frozen=True)
class TensorRule:
    """One of this model's tensors (or one expert's slice of a stacked expert tensor) and the HF tensors it is."""

    param: str  # state-dict key of this model
    hf_names: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]
    kind: RuleKind
    expert: int | None = None  # index into the stacked [E, ...] expert tensor `param`

    def to_param(self, hf: Sequence[torch.Tensor]) -> torch.Tensor:
        """HF tensors (in hf_names order) -> this model's tensor (or expert slice)."""
        if len(hf) != len(self.hf_names):
            raise ValueError(f"{self.param}: got {len(hf)} tensors, expected {len(self.hf_names)} ({self.hf_names})")
        for name, t, shape in zip(self.hf_names, hf, self.hf_shapes):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: shape {list(t.shape)}, expected {list(shape)}")
        if self.kind == "same":
            return hf[0]
        if self.kind == "cat0":
            return torch.cat(list(hf), dim=0)
        if self.kind == "conv":
            return hf[0].squeeze(-1)  # [o, i, 2, 1] -> [o, i, 2]
        return hf[0].t().contiguous()

    def to_hf(self, value: torch.Tensor) -> list[torch.Tensor]:
        """This model's tensor (or expert slice) -> HF tensors in hf_names order (views where possible)."""
        if tuple(value.shape) != self.param_shape:
            raise ValueError(f"{self.param}: shape {list(value.shape)}, expected {list(self.param_shape)}")
        if self.kind == "same":
            return [value]
        if self.kind == "cat0":
            return list(value.split([s[0] for s in self.hf_shapes], dim=0))
        if self.kind == "conv":
            return [value.unsqueeze(-1)]
        return [value.t()]

    @property
    def param_shape(self) -> Shape:
        first = self.hf_shapes[0]
        if self.kind == "cat0":
            return (sum(s[0] for s in self.hf_shapes), *first[1:])
        if self.kind == "conv":
            return first[:-1]
        if self.kind == "transpose":
            return (first[1], first[0])
        return first


def hf_expert_names(layer: int, expert: int) -> tuple[str, str]:
    """(w1, w2) HF names of one expert."""
    stem = f"model.layers.{layer}.mlp.experts.{expert}"
    return f"{stem}.w1.weight", f"{stem}.w2.weight"


def expert_rules(cfg: ModelConfig, layer: int, expert: int) -> tuple[TensorRule, TensorRule]:
    """Rules of one expert: w1 [2f, d] -> w1_d2f, w2 [d, f] -> w2_fd (slices `expert` of the stacked tensors)."""
    if not 0 <= layer < cfg.num_layers or not 0 <= expert < cfg.num_experts:
        raise ValueError(f"(layer {layer}, expert {expert}): the model has {cfg.num_layers} layers of "
                         f"{cfg.num_experts} experts")
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    w1, w2 = hf_expert_names(layer, expert)
    return (TensorRule(expert_param_name(layer, "w1"), (w1,), ((2 * f, d),), "transpose", expert),
            TensorRule(expert_param_name(layer, "w2"), (w2,), ((d, f),), "transpose", expert))


def layer_dense_rules(cfg: ModelConfig, layer: int) -> list[TensorRule]:
    d, e, width = cfg.hidden_size, cfg.num_experts, cfg.attn_width
    hf, ours = f"model.layers.{layer}", f"layers.{layer}"
    attn, lf = f"{hf}.self_attn", f"{hf}.self_attn.lf_gate"
    return [
        TensorRule(f"{ours}.attn_norm.weight", (f"{hf}.input_layernorm.weight",), ((d,),), "same"),
        TensorRule(f"{ours}.attn.lfa.conv1.weight", (f"{lf}.conv1.weight",), ((d // 2, d, 2, 1),), "conv"),
        TensorRule(f"{ours}.attn.lfa.conv1.bias", (f"{lf}.conv1.bias",), ((d // 2,),), "same"),
        TensorRule(f"{ours}.attn.lfa.conv2.weight", (f"{lf}.conv2.weight",), ((d, d // 2, 2, 1),), "conv"),
        TensorRule(f"{ours}.attn.lfa.conv2.bias", (f"{lf}.conv2.bias",), ((d,),), "same"),
        TensorRule(f"{ours}.attn.lfa.norm.weight", (f"{lf}.output_layernorm.weight",), ((d,),), "same"),
        TensorRule(f"{ours}.attn.v_proj.weight", (f"{attn}.v_proj.weight",), ((width, d),), "same"),
        TensorRule(f"{ours}.attn.qk_proj.weight", (f"{attn}.q_proj.weight", f"{attn}.k_proj.weight"),
                   ((width, d), (width, d)), "cat0"),
        TensorRule(f"{ours}.attn.o_proj.weight", (f"{attn}.o_proj.weight",), ((d, width),), "same"),
        TensorRule(f"{ours}.moe_norm.weight", (f"{hf}.post_attention_layernorm.weight",), ((d,),), "same"),
        TensorRule(f"{ours}.moe.router.wqkv",
                   tuple(f"{hf}.mlp.gate.{p}.weight" for p in ("query", "key", "value")), ((e, d),) * 3, "cat0"),
    ]


def dense_rules(cfg: ModelConfig) -> list[TensorRule]:
    """Every tensor that is not an expert's, in checkpoint order: embedding, the layers, the final norm."""
    _check_supported(cfg)
    rules = [TensorRule("embed.weight", ("model.embed_tokens.weight",), ((cfg.vocab_size, cfg.hidden_size),), "same")]
    for layer in range(cfg.num_layers):
        rules += layer_dense_rules(cfg, layer)
    rules.append(TensorRule("final_norm.weight", ("model.norm.weight",), ((cfg.hidden_size,),), "same"))
    return rules


def all_rules(cfg: ModelConfig) -> Iterator[TensorRule]:
    """Dense rules and every expert's, layer by layer (the order an HF save lists them in)."""
    dense = dense_rules(cfg)
    per_layer = len(layer_dense_rules(cfg, 0))
    yield dense[0]
    for layer in range(cfg.num_layers):
        yield from dense[1 + layer * per_layer: 1 + (layer + 1) * per_layer]
        for expert in range(cfg.num_experts):
            yield from expert_rules(cfg, layer, expert)
    yield dense[-1]


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """HF name -> shape of every tensor a checkpoint of cfg must hold, in checkpoint order."""
    return {name: shape for rule in all_rules(cfg) for name, shape in zip(rule.hf_names, rule.hf_shapes)}


def is_ignored_hf_tensor(name: str) -> bool:
    return any(p.fullmatch(name) for p in IGNORED_HF_TENSORS)


def _check_supported(cfg: ModelConfig) -> None:
    if not cfg.lfa or cfg.router != "attention":
        raise ValueError(f"lfa = {cfg.lfa}, router = {cfg.router!r}: the HF Yuan layout has LFA attention and the "
                         "attention router only")
