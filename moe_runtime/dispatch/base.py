"""The Dispatcher contract: the one seam between the model and where experts live.

A dispatcher is an nn.Module with a `placement` and a forward that takes token copies already gathered in plan
order and returns the expert outputs in the same order. Gather and combine stay in MoELayer (plain autograd ops),
so the router gets its gradient through the gates whatever the dispatcher is.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from moe_runtime.dispatch.plan import DispatchPlan
from moe_runtime.runtime.placement import Placement


@runtime_checkable
class Dispatcher(Protocol):
    placement: Placement

    def __call__(self, x_nd: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:  # [T*k, d] -> [T*k, d]
        ...
