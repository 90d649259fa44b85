"""Two-batch overlap: a micro-batch split in two halves that take turns, so one half's expert exchange is in flight
while the other half runs attention and the router (SGLang's two-batch overlap, DeepSeek's DualPipe, on one worker).

Forward, per decoder layer: half A runs attention + router and *starts* its exchange; half B finishes its previous
layer's exchange (combine) and runs attention + router, starting its exchange while A's is in flight; then A
finishes, and so on. A dispatcher that can overlap offers `start(x_nd, plan, ctx) -> handle` with `handle.wait() ->
y_nd` (dispatch/remote.py: the exchange is a pair of autograd functions, so backward overlaps the same way: the
autograd engine runs ready nodes latest-created first, which interleaves the two halves' backward exchanges with
the other half's attention backward). A dispatcher without `start` (LocalDispatcher) runs synchronously here: the
schedule is then the plain computation, in a different order, which is what the equality tests pin down.

Exactness: halves are whole rows (sequences), so attention, norms and routing per token are unchanged. The two
numbers that depend on the whole micro-batch are rebuilt over it: the cross entropy (sum over both halves / all
tokens) and each router's auxiliary loss (computed once over both halves' router outputs, concatenated). Expert
grads on the servers sum over the halves. So the loss and all gradients equal `model.loss` on the whole
micro-batch (up to float summation order). Each half is its own micro-batch on the wire: StepContext micro-batch
2*mb + half, so the servers keep the halves' activations apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from moe_runtime.model.attention import DocumentMask
from moe_runtime.model.moe_layer import StepContext
from moe_runtime.model.plan import DispatchPlan
from moe_runtime.model.router import RouterOutput, switch_load_balancing_loss
from moe_runtime.model.routing import entropy_loss
from moe_runtime.model.transformer import DecoderLayer, MoETransformer

__all__ = ["PendingExperts", "TwoBatchLoss", "half_context", "split_rows", "two_batch_loss"]


class PendingExperts(Protocol):
    """An expert exchange in flight: `wait()` returns the expert outputs [num_copies, d], in plan order."""

    def wait(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class TwoBatchLoss:
    loss: torch.Tensor  # scalar: cross entropy + aux, over the whole micro-batch (== model.loss()[0])
    ce: torch.Tensor  # scalar: cross entropy alone (== model.loss()[1])
    load_le: torch.Tensor  # [L, E] long: token copies per expert over both halves (== model.expert_load())


class _Ready:
    """The outcome of a dispatcher that cannot overlap (computed at start)."""

    def __init__(self, y_nd: torch.Tensor):
        self._y_nd = y_nd

    def wait(self) -> torch.Tensor:
        return self._y_nd


@dataclass
class _InFlight:
    """One half between starting a layer's exchange and combining its outputs."""

    h_bsd: torch.Tensor  # the residual stream after attention
    plan: DispatchPlan
    routed: RouterOutput
    pending: PendingExperts

    def finish(self) -> torch.Tensor:
        y_nd = self.pending.wait()
        out_td = self.plan.combine(y_nd, self.routed.weights)
        return self.h_bsd + out_td.view_as(self.h_bsd)


def split_rows(batch_size: int) -> tuple[slice, slice] | None:
    """The two halves' rows of a micro-batch ([0, ceil(B/2)), [ceil(B/2), B)); None when it has < 2 rows."""
    if batch_size < 2:
        return None
    mid = (batch_size + 1) // 2
    return slice(0, mid), slice(mid, batch_size)


def half_context(ctx: StepContext | None, half: int) -> StepContext | None:
    """The wire micro-batch of one half: 2*mb + half (distinct keys for the servers' saved activations)."""
    if ctx is None:
        return None
    return StepContext(ctx.step, 2 * ctx.micro_batch + half, inference=ctx.inference)


def _start_layer(layer: DecoderLayer, x_bsd: torch.Tensor, ctx: StepContext | None,
                 docs: DocumentMask | None = None) -> _InFlight:  # fmt: skip
    """Attention, router and plan of one half (DecoderLayer.forward + MoELayer.forward up to the dispatch), then
    the exchange started. `docs`: the half's document mask (packed rows), else plain causal attention."""
    h_bsd = x_bsd + layer.attn(layer.attn_norm(x_bsd), None, None, docs)
    moe = layer.moe
    m_td = layer.moe_norm(h_bsd).reshape(-1, h_bsd.shape[-1])
    routed = moe.router(m_td)
    plan = DispatchPlan.build(routed.expert_ids, moe.dispatcher.placement, moe.layer_index, routed.mask)
    x_nd = plan.gather(m_td)
    start = getattr(moe.dispatcher, "start", None)
    pending = start(x_nd, plan, ctx) if start is not None else _Ready(moe.dispatcher(x_nd, plan, ctx))
    moe.last_plan, moe.last_router_output = plan, routed
    return _InFlight(h_bsd, plan, routed, pending)


def _aux_over(router: torch.nn.Module, outs: list[RouterOutput]) -> torch.Tensor:
    """The router's auxiliary loss over the whole micro-batch (both halves' outputs concatenated), the formula of
    model/router.py `_Router.forward`."""
    probs = torch.cat([o.probs for o in outs])
    ids = torch.cat([o.expert_ids for o in outs])
    masks = [o.mask for o in outs]
    mask = None if all(m is None for m in masks) else torch.cat(
        [m if m is not None else torch.ones_like(o.expert_ids, dtype=torch.bool) for m, o in zip(masks, outs)])
    aux = switch_load_balancing_loss(probs, ids, router.aux_loss_coeff, mask)
    routing = getattr(router, "routing", None)
    if routing is not None and routing.kind == "top_p":
        aux = aux + entropy_loss(probs, routing.dynamic_loss_coeff)
    return aux


def _half_documents(model: MoETransformer, tokens_bs: torch.Tensor, documents_bs: torch.Tensor | None,
                    positions_bs: torch.Tensor | None, halves: tuple[slice, slice]) -> list[DocumentMask | None]:  # fmt: skip
    """Each half's document mask (the rows' documents and positions), checked as MoETransformer.forward checks
    the whole batch's; [None, None] without documents. A mask is per row, so a half's equals the whole's rows."""
    if documents_bs is None and positions_bs is None:
        return [None, None]
    if documents_bs is None:
        raise ValueError("positions without documents: pass documents_bs (one document per row: zeros)")
    if documents_bs.shape != tokens_bs.shape:
        raise ValueError(f"documents has shape {list(documents_bs.shape)}: expected the tokens' "
                         f"{list(tokens_bs.shape)}")
    masks = [DocumentMask.build(documents_bs[rows], None if positions_bs is None else positions_bs[rows])
             for rows in halves]  # fmt: skip
    for m in masks:
        if m.table_len > model.cfg.max_seq_len:
            raise ValueError(f"positions reach {m.table_len - 1}: exceeds max_seq_len {model.cfg.max_seq_len}")
    return masks


def two_batch_loss(model: MoETransformer, tokens_bs: torch.Tensor, targets_bs: torch.Tensor,
                   ctx: StepContext | None = None, *, documents_bs: torch.Tensor | None = None,
                   positions_bs: torch.Tensor | None = None) -> TwoBatchLoss:  # fmt: skip
    """`model.loss(tokens, targets, ctx, documents_bs=, positions_bs=)` computed as two pipelined halves (see the
    module docstring); documents / positions (packed rows, data.source files) as in MoETransformer.forward. A
    micro-batch of one row cannot be split: it runs as one (no overlap)."""
    if tokens_bs.dim() != 2 or tokens_bs.shape != targets_bs.shape:
        raise ValueError(f"tokens {list(tokens_bs.shape)} and targets {list(targets_bs.shape)}: expected the same "
                         "[batch, seq] shape")
    if tokens_bs.shape[1] > model.cfg.max_seq_len:
        raise ValueError(f"sequence length {tokens_bs.shape[1]}: exceeds max_seq_len {model.cfg.max_seq_len}")
    halves = split_rows(tokens_bs.shape[0])
    if halves is None:
        loss, ce = model.loss(tokens_bs, targets_bs, ctx, documents_bs=documents_bs, positions_bs=positions_bs)
        return TwoBatchLoss(loss, ce, model.expert_load())
    docs = _half_documents(model, tokens_bs, documents_bs, positions_bs, halves)
    ctxs = [half_context(ctx, h) for h in (0, 1)]
    x = [model.embed(tokens_bs[rows]) for rows in halves]
    in_flight: list[_InFlight | None] = [None, None]
    routed: list[list[RouterOutput]] = []
    loads = []
    for layer in model.layers:
        for h in (0, 1):
            if in_flight[h] is not None:
                x[h] = in_flight[h].finish()
            in_flight[h] = _start_layer(layer, x[h], ctxs[h], docs[h])
        routed.append([in_flight[0].routed, in_flight[1].routed])
        loads.append(in_flight[0].plan.expert_counts + in_flight[1].plan.expert_counts)
    ce_sum = None
    for h, rows in enumerate(halves):
        x_h = in_flight[h].finish()
        logits = F.linear(model.final_norm(x_h), model.embed.weight)
        part = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets_bs[rows].reshape(-1),
                               reduction="sum")  # fmt: skip
        ce_sum = part if ce_sum is None else ce_sum + part
    ce = ce_sum / targets_bs.numel()
    aux = ce.new_zeros(())
    for layer, outs in zip(model.layers, routed):
        aux = aux + _aux_over(layer.moe.router, outs)
    return TwoBatchLoss(ce + aux, ce, torch.stack(loads))
