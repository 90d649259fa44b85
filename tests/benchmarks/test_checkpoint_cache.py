"""benchmarks/_checkpoint_cache.py: a cached random checkpoint has the bytes a fresh write gives, is reused only
for the same key, and a new key replaces the old entry."""

from __future__ import annotations

import torch

from benchmarks._checkpoint_cache import cached_random_checkpoint, checkpoint_key
from moe_runtime.checkpoint.synthetic import write_random_checkpoint
from moe_runtime.config import ModelConfig


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_cached_checkpoint_is_the_fresh_one_and_is_reused_only_for_its_key(tmp_path):
    m = ModelConfig(preset="tiny", rotary_dim=32)  # the HF layout rotates every channel of a head
    first, reused = cached_random_checkpoint("t", m, cache_dir=tmp_path / "cache")
    assert not reused
    again, reused = cached_random_checkpoint("t", m, cache_dir=tmp_path / "cache")
    assert reused and again == first
    fresh = write_random_checkpoint(tmp_path / "fresh", m, dtype=torch.bfloat16, max_shard_bytes=1 << 30)
    assert _files(first) == _files(fresh)
    other, reused = cached_random_checkpoint("t", m, seed=1, cache_dir=tmp_path / "cache")
    assert not reused and other != first and not first.exists()  # one entry per name
    assert checkpoint_key(m, 0, torch.bfloat16, 1 << 30) != checkpoint_key(m, 0, torch.float32, 1 << 30)
