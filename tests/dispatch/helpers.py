"""Shared by the data-plane tests: random shards, dispatch/backward frames, and catching ExpertCallError."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.dispatch.client import ExpertCallError
from moe_runtime.dispatch.codec import encode_frame

TOKEN = "test-token"
D, FF = 16, 24


def make_shards(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(D, 2 * FF, generator=g) * 0.3, torch.randn(FF, D, generator=g) * 0.3) for k in keys}


def dispatch_frame(experts, counts, x, *, layer=0, step=0, mb=0, pv=0, wire=None, meta=None, kind="dispatch",
                   name="x"):  # fmt: skip
    return encode_frame(
        kind, layer=layer, step=step, mb=mb, pv=pv, experts=experts, counts=counts, tensors={name: x},
        wire_dtype=wire, meta=meta,
    )  # fmt: skip


def call_code(fn):
    with pytest.raises(ExpertCallError) as info:
        fn()
    return info.value
