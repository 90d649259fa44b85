"""A random-weight checkpoint kept between runs (runs/cache/<name>/<key>/): benchmarks/real_width.py --quick loads
the same 1.4 GiB synthetic checkpoint every time, and writing it (fp32 draws, bf16 conversion, 1.4 GiB to disk)
was ~10 s of the quick run that measures nothing. The key covers everything the bytes depend on: the model
config, seed, dtype, shard size and the source of the modules that draw and lay out the tensors; a directory
is used only once complete (written under a temporary name, config.json last, then renamed). One entry is kept
per name: a new key replaces the old one (1.4 GiB each)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from moe_runtime.checkpoint import hf_config, hf_layout, hf_writer, synthetic
from moe_runtime.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = ROOT / "runs" / "cache"


def checkpoint_key(model: ModelConfig, seed: int, dtype: torch.dtype, max_shard_bytes: int) -> str:
    h = hashlib.sha256(json.dumps([model.model_dump(mode="json"), seed, str(dtype), max_shard_bytes],
                                  sort_keys=True).encode())
    for mod in (synthetic, hf_writer, hf_layout, hf_config):  # a change in how the tensors are made: a new key
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:20]


def cached_random_checkpoint(name: str, model: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                             max_shard_bytes: int = 1 << 30, cache_dir: Path = CACHE_DIR) -> tuple[Path, bool]:
    """(directory, reused): synthetic.write_random_checkpoint(model, seed, dtype, max_shard_bytes), from the
    cache when a complete one with the same key is there."""
    root = cache_dir / name
    final = root / checkpoint_key(model, seed, dtype, max_shard_bytes)
    if (final / hf_writer.CONFIG_FILE).is_file():
        return final, True
    if root.is_dir():
        shutil.rmtree(root)  # older keys and interrupted writes
    tmp = root / f"{final.name}.tmp{os.getpid()}"
    synthetic.write_random_checkpoint(tmp, model, seed=seed, dtype=dtype, max_shard_bytes=max_shard_bytes)
    tmp.rename(final)
    return final, False


__all__ = ["CACHE_DIR", "cached_random_checkpoint", "checkpoint_key"]
