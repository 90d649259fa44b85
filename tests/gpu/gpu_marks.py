"""Marks shared by the GPU tests: `gpu` (pyproject declares it) and a clean skip when no CUDA device is visible."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device visible")]


def on(device: str):
    """A `device` parameter: "cpu" always runs (the same code with device="cpu"), "cuda" only on a GPU."""
    return pytest.param(device, marks=GPU if device == "cuda" else [], id=device)


def gpu_only(fn):
    """Decorator: the `gpu` mark and the skip without CUDA."""
    for mark in reversed(GPU):
        fn = mark(fn)
    return fn
