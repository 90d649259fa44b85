"""The Yuan-M32-style decoder: embedding -> N x [pre-norm LFA attention, pre-norm MoE] -> final norm -> tied head.

Decoder layer: h = x + Attention(RMSNorm(x)); out = h + MoE(RMSNorm(h)).
Where experts live is decided by `dispatcher_factory(layer_index)`: in-process experts by default (the oracle),
remote experts in the cluster. The dense part is identical either way.

Incremental decoding: `forward(tokens, cache=KVCache)` continues each cached row (prefill = an empty cache,
a decode step = one token per row); attention reads and extends the cache, the MoE layers see the real new
tokens only, through the same MoELayer and dispatcher as a full forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_runtime.config import ModelConfig
from moe_runtime.model.attention import CacheStep, DocumentMask, KVCache, LayerKVCache, build_attention
from moe_runtime.model.experts import SwiGLUExperts
from moe_runtime.model.moe_layer import Dispatcher, LocalDispatcher, MoELayer, StepContext
from moe_runtime.model.norm import RMSNorm
from moe_runtime.model.router import build_router
from moe_runtime.model.routing import RoutingSpec, expert_nodes
from moe_runtime.model.weight_storage import expert_storage_dtype
from moe_runtime.placement import Placement

DispatcherFactory = Callable[[int], Dispatcher]


def local_dispatcher_factory(cfg: ModelConfig) -> DispatcherFactory:
    def make(layer_index: int) -> Dispatcher:
        experts = SwiGLUExperts(cfg.num_experts, cfg.hidden_size, cfg.ffn_hidden_size, cfg.init_std,
                                expert_storage_dtype(cfg))
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
                              cfg.init_std, RoutingSpec.from_config(cfg))
        self.moe = MoELayer(router, dispatcher, layer_index)

    def forward(
        self,
        x_bsd: torch.Tensor,
        ctx: StepContext | None = None,
        kv: LayerKVCache | None = None,
        step: CacheStep | None = None,
        docs: DocumentMask | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mods = self._modules  # submodules by dict: each `self.attn` misses __dict__ (~5k instructions, per step)
        h = x_bsd + mods["attn"](mods["attn_norm"](x_bsd), kv, step, docs)
        m_bsd = mods["moe_norm"](h)
        if step is None or not step.padded:
            y, aux = mods["moe"](m_bsd, ctx)
            return h + y, aux
        # Right-padded rows: only real tokens go to the experts (pads would cost transfers and skew the load).
        m_td = m_bsd.reshape(-1, m_bsd.shape[-1])
        y_1nd, aux = mods["moe"](m_td.index_select(0, step.valid_index_n).unsqueeze(0), ctx)
        y_td = m_td.new_zeros(m_td.shape).index_copy_(0, step.valid_index_n, y_1nd[0])
        return h + y_td.view_as(h), aux


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

    def forward(
        self,
        tokens_bs: torch.Tensor,
        ctx: StepContext | None = None,
        *,
        cache: KVCache | None = None,
        num_new: Sequence[int] | torch.Tensor | None = None,
        last_logits_only: bool = False,
        documents_bs: torch.Tensor | None = None,
        positions_bs: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits [B, S, V]; with last_logits_only, [B, 1, V] at each row's last real token.

        `ctx`: the step and micro-batch, passed to every MoE layer's dispatcher (remote ones need it).
        `cache`: tokens_bs continues the cache's rows (right-padded: row b has num_new[b] real tokens, all S by
        default) and the cache is extended in place. Inference only (run under torch.no_grad()).
        `documents_bs` [B, S]: rows packed with documents (data_files.py): attention stays inside each
        document; `positions_bs` [B, S]: rope positions (e.g. restarting per document). Full-sequence only.
        """
        if tokens_bs.dim() != 2:
            raise ValueError(f"tokens has shape {list(tokens_bs.shape)}: expected [batch, seq]")
        b, s = tokens_bs.shape
        step = None
        if cache is None:
            if num_new is not None:
                raise ValueError("num_new without a cache: padding is only described for a cached forward")
            if s > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {s}: exceeds max_seq_len {self.cfg.max_seq_len}")
        else:
            if cache.batch_size != b:
                raise ValueError(f"tokens has {b} rows: the cache has {cache.batch_size}")
            if num_new is None:
                num_new = [s] * b
            elif isinstance(num_new, torch.Tensor):
                num_new = num_new.tolist()
            step = cache.begin(num_new, s, tokens_bs.device)
        docs = None
        if documents_bs is not None or positions_bs is not None:
            if cache is not None:
                raise ValueError("documents / positions with a cache: document masks are for a full-sequence "
                                 "forward")
            if documents_bs is None:
                raise ValueError("positions without documents: pass documents_bs (one document per row: zeros)")
            if documents_bs.shape != tokens_bs.shape:
                raise ValueError(f"documents has shape {list(documents_bs.shape)}: expected the tokens' "
                                 f"{list(tokens_bs.shape)}")
            docs = DocumentMask.build(documents_bs, positions_bs)
            if docs.table_len > self.cfg.max_seq_len:
                raise ValueError(f"positions reach {docs.table_len - 1}: exceeds max_seq_len {self.cfg.max_seq_len}")
        mods = self._modules  # submodules by dict (an nn.Module attribute miss costs ~5k instructions)
        embed = mods["embed"]
        x = embed(tokens_bs)
        aux = None  # the layers' sum (0 + a0 would be a0: one op fewer per forward)
        for i, layer in enumerate(mods["layers"]):
            x, layer_aux = layer(x, ctx, None if cache is None else cache.layers[i], step, docs)
            aux = layer_aux if aux is None else aux + layer_aux
        if cache is not None:
            cache.advance(step)
        if last_logits_only:
            padded = step is not None and step.padded
            if padded:
                x = x.reshape(b * s, -1).index_select(0, step.last_index_b)[:, None]
            elif s > 1:  # one column (a decode step) is already the last
                x = x[:, -1:]
        logits = F.linear(mods["final_norm"](x), embed._parameters["weight"])  # LM head tied with the embedding
        return ModelOutput(logits, aux)

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """An empty decoding cache for batch_size rows on this model's device and dtype."""
        w = self.embed.weight
        return KVCache.allocate(self.cfg, batch_size, capacity, w.dtype, w.device)

    def loss(self, tokens_bs: torch.Tensor, targets_bs: torch.Tensor, ctx: StepContext | None = None, *,
             documents_bs: torch.Tensor | None = None,
             positions_bs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(total loss = cross entropy + aux, cross entropy alone); documents / positions as in forward."""
        out = self.forward(tokens_bs, ctx, documents_bs=documents_bs, positions_bs=positions_bs)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), targets_bs.reshape(-1))
        return ce + out.aux_loss, ce

    def set_expert_nodes(self, placement: Placement) -> None:
        """Node-limited routing: give every router the node of each of its layer's experts (its primary replica's
        node in `placement`). Call on every placement change; a no-op for the other routings."""
        if self.cfg.routing != "node_limited":
            return
        for i, moe in enumerate(self.moe_layers):
            moe.router.set_expert_nodes(expert_nodes(placement, i))

    def expert_load(self) -> torch.Tensor:
        """[L, E] token copies per expert in the last forward."""
        return torch.stack([m.last_plan.expert_counts for m in self.moe_layers])


def build_model(cfg: ModelConfig, seed: int, dispatcher_factory: DispatcherFactory | None = None) -> MoETransformer:
    """Deterministic construction: the same (cfg, seed) gives the same weights in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MoETransformer(cfg, dispatcher_factory)
