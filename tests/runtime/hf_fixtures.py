"""HF-layout checkpoints for the runtime's checkpoint tests: the official fixture of tests/checkpoint/official.py
with a vocabulary large enough for the byte-level corpus and a SentencePiece tokenizer trained here."""

from __future__ import annotations

import io
import sysconfig
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

from moe_runtime.config import RuntimeConfig, parse_config
from tests.checkpoint.official import hf_config, official_tensors, write_checkpoint

VOCAB = 400  # >= the byte corpus' 259 ids and the tokenizer's 400 pieces
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def train_tokenizer(path: Path, vocab: int = VOCAB) -> Path:
    lines = []
    for name in ("textwrap.py", "string.py", "json/__init__.py", "fnmatch.py"):
        lines += [line for line in (STDLIB / name).read_text().splitlines() if line.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True, split_digits=True,
        character_coverage=1.0, user_defined_symbols=["<eod>", "<sep>", "<pad>"], minloglevel=2,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(out.getvalue())
    return path


def make_checkpoint(directory: Path, *, dtype: torch.dtype = torch.bfloat16, shards: int = 3, seed: int = 0,
                    tokenizer: bool = True, **changes: Any) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """(directory, config.json dict, the tensors as stored) of a checkpoint in the official layout."""
    cfg = hf_config(**{"vocab_size": VOCAB, **changes})
    weights = official_tensors(cfg, seed=seed, dtype=dtype, lm_head=True)
    write_checkpoint(directory, cfg, weights, "safetensors", shards)
    if tokenizer:
        train_tokenizer(directory)
    return directory, cfg, weights


def cluster_config(checkpoint: Path, tmp: Path, **cluster: Any) -> RuntimeConfig:
    """A small cluster that runs the checkpoint's model (resolved as the CLI resolves it); no GPUs asked for."""
    from moe_runtime.checkpoint.run_config import resolve_checkpoint

    return resolve_checkpoint({
        "model": {"checkpoint": str(checkpoint)},
        "data": {"max_files": 40},
        "train": {"steps": 2, "batch_size": 4, "seq_len": 32, "warmup_steps": 1, "checkpoint_dir": str(tmp / "auto")},
        "cluster": {"num_gpus": 0, "gpus_per_expert_actor": 0, "expert_actors": 2, "router_workers": 2, **cluster},
    }, "<test>")


__all__ = ["VOCAB", "cluster_config", "make_checkpoint", "parse_config", "train_tokenizer"]
