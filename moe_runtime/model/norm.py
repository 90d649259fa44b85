"""RMSNorm as used by Yuan 2.0-M32 (pre-norm layers, the final norm and the LFA filter's own norm)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2, last dim) + eps) * weight, computed in float32 (float64 stays float64) and cast
    back to x's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not torch.is_grad_enabled():
            # inference (a decode step is per-op overhead): F.rms_norm's own ops without its wrapping, eps and the
            # width as tensors (a Python scalar costs a wrapped-number tensor per call), the mean as what
            # torch.mean runs inside (sum, then divide by the count) and `+ eps` in the same call (addcdiv: eps +
            # sum / width, each op rounded as before): the same numbers bit for bit (tests/model/test_norm.py);
            # autograd keeps the explicit ops below
            weight = self._parameters["weight"]  # by dict: `self.weight` is an nn.Module attribute miss (~5k instr.)
            consts = self.__dict__.get("_consts")
            if consts is None or consts[0].device != x.device:
                with torch.inference_mode(False):  # normal tensors: usable by later no_grad forwards too
                    consts = (torch.tensor(self.eps, dtype=torch.float32, device=x.device),
                              torch.tensor(float(weight.shape[0]), dtype=torch.float32, device=x.device))
                self.__dict__["_consts"] = consts
            eps_t, width_t = consts
            return x.mul(torch.rsqrt_(torch.addcdiv(eps_t, torch.sum(x * x, -1, keepdim=True), width_t))).mul_(weight)
        compute = torch.promote_types(x.dtype, torch.float32)
        xc = x.to(compute)
        y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(compute)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
