"""LocalDispatcher: experts in this process. The numerical oracle every distributed path is compared against."""

from __future__ import annotations

import torch
from torch import nn

from moe_runtime.dispatch.plan import DispatchPlan
from moe_runtime.model.experts import SwiGLUExperts
from moe_runtime.runtime.placement import Placement


class LocalDispatcher(nn.Module):
    def __init__(self, experts: SwiGLUExperts, placement: Placement | None = None, num_layers: int = 1):
        super().__init__()
        self.experts = experts
        # One "actor" (this process) holds every expert; the layer index is irrelevant to the split.
        self.placement = placement or Placement.contiguous(num_layers, experts.num_experts, 1)

    def forward(self, x_nd: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return self.experts(x_nd, [s.count for s in plan.segments], [s.expert for s in plan.segments])
