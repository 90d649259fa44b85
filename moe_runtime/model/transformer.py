"""The Yuan-M32-style decoder: embedding -> N x [pre-norm LFA attention, pre-norm MoE] -> final norm -> tied head.

Decoder layer: h = x + Attention(RMSNorm(x)); out = h + MoE(RMSNorm(h)).
Where experts live is decided by `dispatcher_factory(layer_index)`: in-process experts by default (the oracle),
remote experts in the cluster. The dense part is identical either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_runtime.config import ModelConfig
from moe_runtime.model.attention import build_attention
from moe_runtime.model.experts import SwiGLUExperts
from moe_runtime.model.moe_layer import Dispatcher, LocalDispatcher, MoELayer
from moe_runtime.model.norm import RMSNorm
from moe_runtime.model.router import build_router

DispatcherFactory = Callable[[int], Dispatcher]


def local_dispatcher_factory(cfg: ModelConfig) -> DispatcherFactory:
    def make(layer_index: int) -> Dispatcher:
        experts = SwiGLUExperts(cfg.num_experts, cfg.hidden_size, cfg.ffn_hidden_size, cfg.init_std)
        return LocalDispatcher(experts, num_layers=cfg.num_layers)

    return make


def expert_param_name(layer: int, which: str) -> str:
    """State-dict key of the stacked expert weights ('w1' or 'w2') of one layer in the in-process model."""
    return f"layers.{layer}.moe.dispatcher.experts.{which}"


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, V]
    aux_loss: torch.Tensor  # scalar: sum of the routers' aux losses


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, dispatcher: Dispatcher):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.moe_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        router = build_router(cfg.router, cfg.hidden_size, cfg.num_experts, cfg.top_k, cfg.aux_loss_coeff,
                              cfg.init_std)
        self.moe = MoELayer(router, dispatcher, layer_index)

    def forward(self, x_bsd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x_bsd + self.attn(self.attn_norm(x_bsd))
        y, aux = self.moe(self.moe_norm(h))
        return h + y, aux


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, dispatcher_factory: DispatcherFactory | None = None):
        super().__init__()
        self.cfg = cfg
        factory = dispatcher_factory or local_dispatcher_factory(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, factory(i)) for i in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [layer.moe for layer in self.layers]

    def forward(self, tokens_bs: torch.Tensor) -> ModelOutput:
        if tokens_bs.dim() != 2:
            raise ValueError(f"tokens has shape {list(tokens_bs.shape)}: expected [batch, seq]")
        if tokens_bs.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens_bs.shape[1]}: exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.embed(tokens_bs)
        aux = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, layer_aux = layer(x)
            aux = aux + layer_aux
        logits = F.linear(self.final_norm(x), self.embed.weight)  # LM head tied with the input embedding
        return ModelOutput(logits, aux)

    def loss(self, tokens_bs: torch.Tensor, targets_bs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss = cross entropy + aux, cross entropy alone)."""
        out = self.forward(tokens_bs)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), targets_bs.reshape(-1))
        return ce + out.aux_loss, ce

    def expert_load(self) -> torch.Tensor:
        """[L, E] token copies per expert in the last forward."""
        return torch.stack([m.last_plan.expert_counts for m in self.moe_layers])


def build_model(cfg: ModelConfig, seed: int, dispatcher_factory: DispatcherFactory | None = None) -> MoETransformer:
    """Deterministic construction: the same (cfg, seed) gives the same weights in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MoETransformer(cfg, dispatcher_factory)
