"""MoELayer(router, dispatcher): route -> plan -> dispatch -> combine. Knows nothing about where experts live."""

from __future__ import annotations

import torch
from torch import nn

from moe_runtime.dispatch.base import Dispatcher
from moe_runtime.dispatch.plan import DispatchPlan
from moe_runtime.model.router import RouterOutput


class MoELayer(nn.Module):
    def __init__(self, router: nn.Module, dispatcher: Dispatcher, layer_index: int):
        super().__init__()
        self.router = router
        self.dispatcher = dispatcher
        self.layer_index = layer_index
        self.last_plan: DispatchPlan | None = None  # read by load statistics after forward
        self.last_router_output: RouterOutput | None = None

    def forward(self, x_bsd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_td = x_bsd.reshape(-1, x_bsd.shape[-1])
        routed = self.router(x_td)
        plan = DispatchPlan.build(routed.expert_ids, self.dispatcher.placement, self.layer_index)
        y_nd = self.dispatcher(plan.gather(x_td), plan)
        out_td = plan.combine(y_nd, routed.weights)
        self.last_plan, self.last_router_output = plan, routed
        return out_td.view_as(x_bsd), routed.aux_loss
