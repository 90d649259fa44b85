"""A random-weight checkpoint in the HF Yuan layout, written one tensor at a time (never the whole model in memory):
the real-width slice's test and benchmark load it as they would the released checkpoint.

Scales keep activations O(1) and routing away from ties, as tests/checkpoint/official.py does: linear weights
N(0, 1/fan_in), norms 1 + 0.2 N(0, 1), conv kernels N(0, 1/(2 x in)), router projections 2 N(0, 1/d), embedding N(0, 1).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from moe_runtime.checkpoint.hf_config import SpecialTokens
from moe_runtime.checkpoint.hf_layout import expected_hf_shapes
from moe_runtime.checkpoint.hf_writer import DEFAULT_MAX_SHARD_BYTES, HFCheckpointWriter
from moe_runtime.config import ModelConfig


def random_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """One tensor of the layout, drawn in fp32 at the scale its role needs."""
    t = torch.randn(shape, generator=g)
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return t.mul_(0.2).add_(1.0)
    if name.endswith(".bias"):
        return t.mul_(0.1)
    if "lf_gate.conv" in name:
        return t.div_(math.sqrt(2 * shape[1]))
    if name == "model.embed_tokens.weight":
        return t
    scale = 2.0 if ".mlp.gate." in name else 1.0
    return t.mul_(scale / math.sqrt(shape[1]))


def write_random_checkpoint(directory: str | Path, cfg: ModelConfig, *, seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                            tokens: SpecialTokens | None = None) -> Path:
    """config.json + safetensors shards (+ index) of cfg with random weights; returns the directory."""
    g = torch.Generator().manual_seed(seed)
    tokens = tokens or SpecialTokens(eod=cfg.vocab_size - 3, sep=cfg.vocab_size - 2, pad=cfg.vocab_size - 1)
    with HFCheckpointWriter(directory, cfg, dtype=dtype, max_shard_bytes=max_shard_bytes, tokens=tokens) as w:
        for name, shape in expected_hf_shapes(cfg).items():
            w.write_hf(name, random_tensor(name, shape, g))
    return Path(directory)


__all__ = ["random_tensor", "write_random_checkpoint"]
