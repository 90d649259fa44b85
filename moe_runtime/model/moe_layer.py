"""MoELayer(router, dispatcher): route -> plan -> dispatch -> combine. Knows nothing about where experts live.

The layer declares the one seam it consumes, `Dispatcher`; `LocalDispatcher` (experts in this process) is the
numerical oracle every distributed path is compared against. Transports (dispatch/) implement the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from moe_runtime.model.experts import SwiGLUExperts, swiglu
from moe_runtime.model.plan import DispatchPlan
from moe_runtime.model.router import RouterOutput
from moe_runtime.placement import Placement

# Up to this many token copies an inference dispatch runs segment by segment (LocalDispatcher._few_segments):
# measured faster than grouped_swiglu's padded path only at batch-1 decode (2 copies at top-2).
SMALL_DISPATCH_COPIES = 2


@dataclass(frozen=True)
class StepContext:
    """The training step and micro-batch a forward belongs to: a remote dispatcher keys what the expert servers
    keep for backward by it. Travels with each call (model -> layer -> dispatcher)."""

    step: int
    micro_batch: int = 0
    # Inference (a generation engine's prefill or decode step): servers keep nothing for backward, so its
    # numbering (step = the decode step) can never meet a training step's saved activations.
    inference: bool = False

    @classmethod
    def for_inference(cls, step: int) -> StepContext:
        return cls(step, 0, inference=True)

    def __post_init__(self) -> None:
        if self.step < 0 or self.micro_batch < 0:
            raise ValueError(f"StepContext({self.step}, {self.micro_batch}): expected non-negative step and "
                             "micro-batch")


@runtime_checkable
class Dispatcher(Protocol):
    """Takes token copies already gathered in plan order, returns the expert outputs in the same order.

    Gather and combine stay in MoELayer (plain autograd ops), so the router gets its gradient through the gates
    whatever the dispatcher is. `ctx` is None outside a training step; a dispatcher that needs it says so.
    """

    placement: Placement

    def __call__(self, x_nd: torch.Tensor, plan: DispatchPlan, ctx: StepContext | None) -> torch.Tensor:
        """[num_copies, d] -> [num_copies, d] (T*k for fixed top-k)"""
        ...


class LocalDispatcher(nn.Module):
    def __init__(self, experts: SwiGLUExperts, placement: Placement | None = None, num_layers: int = 1):
        super().__init__()
        self.experts = experts
        # One "actor" (this process) holds every expert; the layer index is irrelevant to the split.
        self.placement = placement or Placement.contiguous(num_layers, experts.num_experts, 1)

    def forward(self, x_nd: torch.Tensor, plan: DispatchPlan, ctx: StepContext | None = None) -> torch.Tensor:
        if x_nd.shape[0] <= SMALL_DISPATCH_COPIES and not torch.is_grad_enabled():
            return self._few_segments(x_nd, plan)
        return self.experts(x_nd, [s.count for s in plan.segments], [s.expert for s in plan.segments])

    def _few_segments(self, x_nd: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Inference on a couple of copies (a batch-1 decode step): one SwiGLU per segment on views of the
        stacked weights, without grouped_swiglu's path choice and index work. The same ops as its loop path."""
        w1, w2 = self.experts.w1, self.experts.w2
        dt = x_nd.dtype  # weights stored in bf16 (model.expert_weight_dtype) are converted per expert; else no-op
        outs = [swiglu(x_nd[s.start : s.start + s.count], w1[s.expert].to(dt), w2[s.expert].to(dt))
                for s in plan.segments]
        if not outs:
            return x_nd.new_zeros(0, w2.shape[-1])
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def one_token(self, x_1d: torch.Tensor, expert_ids: list[int], weights_1k: torch.Tensor) -> torch.Tensor:
        """Dispatch and combine of ONE token without a plan (inference, a batch-1 decode step): each chosen
        expert's SwiGLU on x times its gate, summed in plan order (expert id, stable), the order combine's
        index_add adds them in, so the same numbers bit for bit; [1, d] -> [1, d]."""
        w1_views, w2_views = self._expert_views()
        dt = x_1d.dtype  # weights stored in another dtype (bf16) are converted per expert, as in _few_segments
        gates_k = (weights_1k if weights_1k.dtype == dt else weights_1k.to(dt)).view(-1).unbind(0)  # 0-dim each
        out = None
        for j in sorted(range(len(expert_ids)), key=expert_ids.__getitem__):
            e = expert_ids[j]
            w1e, w2e = w1_views[e], w2_views[e]
            if w1e.dtype != dt:
                w1e, w2e = w1e.to(dt), w2e.to(dt)
            y = swiglu(x_1d, w1e, w2e).mul_(gates_k[j])
            out = y if out is None else out.add_(y)
        return x_1d.new_zeros(x_1d.shape) if out is None else out

    def _expert_views(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Each expert's w1 and w2 as views (w1[e] is the same memory), made once instead of two indexing ops per
        expert per step; remade when a weight's storage changes (`.to()`, a replaced Parameter: the old views keep
        the old storage alive, so an equal data_ptr means the same storage). In-place updates show through."""
        params = self._modules["experts"]._parameters  # by dict: nn.Module attribute misses cost ~5k instr. each
        w1, w2 = params["w1"], params["w2"]
        key = (w1.data_ptr(), w2.data_ptr())
        cached = self.__dict__.get("_views")
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # normal views of the leaves, no autograd nodes
                cached = self.__dict__["_views"] = (key, w1.detach().unbind(0), w2.detach().unbind(0))
        return cached[1], cached[2]


class MoELayer(nn.Module):
    def __init__(self, router: nn.Module, dispatcher: Dispatcher, layer_index: int):
        super().__init__()
        self.router = router
        self.dispatcher = dispatcher
        self.layer_index = layer_index
        self.last_plan: DispatchPlan | None = None  # read by load statistics after forward
        self.last_router_output: RouterOutput | None = None

    @property
    def last_plan(self) -> DispatchPlan | None:
        """The last forward's plan; a one-token local forward builds it only here, when someone reads it."""
        plan = self.__dict__.get("_last_plan")
        pending = self.__dict__.get("_pending_plan")
        if plan is None and pending is not None:
            ids_tk, placement = pending
            plan = DispatchPlan.build(ids_tk, placement, self.layer_index)
            self.__dict__["_last_plan"], self.__dict__["_pending_plan"] = plan, None
        return plan

    @last_plan.setter
    def last_plan(self, plan: DispatchPlan | None) -> None:
        self.__dict__["_last_plan"], self.__dict__["_pending_plan"] = plan, None

    def forward(self, x_bsd: torch.Tensor, ctx: StepContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x_td = x_bsd.reshape(-1, x_bsd.shape[-1])
        mods = self._modules  # by dict: each nn.Module attribute miss costs ~5k instructions (per decode step)
        routed = mods["router"](x_td)
        dispatcher = mods["dispatcher"]
        if (x_td.shape[0] == 1 and routed.mask is None and isinstance(dispatcher, LocalDispatcher)
                and not torch.is_grad_enabled()):
            # one token in process (batch-1 decode): no plan, gather or index_add (per-op overhead rules there)
            out_td = dispatcher.one_token(x_td, routed.expert_ids.tolist()[0], routed.weights)
            self.__dict__["_last_plan"], self.__dict__["last_router_output"] = None, routed
            self.__dict__["_pending_plan"] = (routed.expert_ids, dispatcher.placement)
            return out_td.view_as(x_bsd), routed.aux_loss
        plan = DispatchPlan.build(routed.expert_ids, self.dispatcher.placement, self.layer_index, routed.mask)
        fused = getattr(self.dispatcher, "dispatch_combine", None)  # a remote dispatcher: combine from the replies
        if fused is not None:
            out_td = fused(plan.gather(x_td), plan, ctx, routed.weights)
        else:
            out_td = plan.combine(self.dispatcher(plan.gather(x_td), plan, ctx), routed.weights)
        # plain attributes (neither tensors nor modules): skip nn.Module.__setattr__'s registry checks, per step
        self.__dict__["_last_plan"], self.__dict__["last_router_output"] = plan, routed
        self.__dict__["_pending_plan"] = None
        return out_td.view_as(x_bsd), routed.aux_loss
