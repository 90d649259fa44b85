"""AdamW without torch.optim.Optimizer: torch's own update function, with the state and groups AdamW keeps.

torch.optim.Optimizer imports torch._dynamo when it is constructed (add_param_group) and at each step and
zero_grad: ~1 CPU-s a process here, a third of a party's start, paid again by every restarted training party
before its first step. `AdamW.step` calls the function torch.optim.AdamW(foreach=False).step calls
(torch.optim.adam.adam, decoupled weight decay) with the same arguments and the same lazily made state, so the
update is bit-identical (tests/test_adamw.py). It keeps what the schedule and the checkpoint code use: `state`
(parameter -> {"step", "exp_avg", "exp_avg_sq"}) and `param_groups` (dicts with "params", "lr", "betas", "eps",
"weight_decay").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.optim.adam import adam

__all__ = ["AdamW"]


class AdamW:
    """torch.optim.AdamW(groups, lr, betas, eps, foreach=False) for the step / zero_grad / state it is used for."""

    def __init__(self, groups: Iterable[Mapping[str, Any]], lr: float, betas: tuple[float, float], eps: float):
        self.param_groups: list[dict[str, Any]] = []
        for g in groups:
            params = list(g["params"])
            if any(not isinstance(p, torch.Tensor) or not p.is_leaf for p in params):
                raise ValueError("AdamW: every parameter must be a leaf tensor")
            self.param_groups.append({"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": 0.0, **g,
                                      "params": params})  # fmt: skip
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        st = self.state.get(p)
        if not st:  # what Adam._init_group makes on a parameter's first step (CPU step counter, fp32 by default)
            dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            st = self.state[p] = {"step": torch.tensor(0.0, dtype=dtype, device="cpu"),
                                  "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                  "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}  # fmt: skip
        return st

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            beta1, beta2 = group["betas"]
            adam(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                 [], [s["step"] for s in states], foreach=False, capturable=False, differentiable=False, fused=None,
                 grad_scale=None, found_inf=None, has_complex=any(torch.is_complex(p) for p in params),
                 decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                 weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)  # fmt: skip

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            raise ValueError("AdamW.zero_grad: only set_to_none=True (what every caller here wants)")
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
