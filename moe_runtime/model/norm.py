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
            # inference (a decode step is per-op overhead): F.rms_norm's own ops without its wrapping, and eps as
            # a tensor (a Python scalar costs a wrapped-number tensor per call): the same numbers bit for bit
            # (tests/model/test_norm.py); autograd keeps the explicit ops below
            eps_t = self.__dict__.get("_eps_t")
            if eps_t is None or eps_t.device != x.device:
                with torch.inference_mode(False):  # a normal tensor: usable by later no_grad forwards too
                    eps_t = torch.tensor(self.eps, dtype=torch.float32, device=x.device)
                self.__dict__["_eps_t"] = eps_t
            return x.mul(torch.rsqrt_(torch.mean(x * x, -1, keepdim=True).add_(eps_t))).mul_(self.weight)
        compute = torch.promote_types(x.dtype, torch.float32)
        xc = x.to(compute)
        y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(compute)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
