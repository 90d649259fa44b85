"""The tokenizer a run's text goes through: the checkpoint's `tokenizer.model` when the model came from an HF
checkpoint that has one, else the presets' byte-level vocabulary (`--text`, `--prompt`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_runtime.checkpoint.hf_config import CheckpointError
from moe_runtime.checkpoint.tokenizer import load_tokenizer
from moe_runtime.config import ModelConfig
from moe_runtime.generation.byte_tokenizer import ByteTokenizer, token_repr


@dataclass(frozen=True)
class RunTokenizer:
    tokenizer: Any  # encode(str) -> list[int], decode(list[int]) -> str
    eod_id: int | None
    kind: str  # "sentencepiece" or "byte"

    def piece(self, token: int) -> str:
        """One token as text, for a table of predictions."""
        if self.kind == "byte":
            return token_repr(token)
        return self.tokenizer.decode([token])


def tokenizer_for(model: ModelConfig) -> RunTokenizer:
    if model.checkpoint is None:
        return RunTokenizer(ByteTokenizer(), ByteTokenizer.eod_id, "byte")
    import json

    from moe_runtime.checkpoint.hf_config import parse_hf_config

    path = Path(model.checkpoint) / "config.json"
    try:
        tokens = parse_hf_config(json.loads(path.read_text()), str(path)).tokens
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    tok = load_tokenizer(model.checkpoint, tokens)
    if tok is None:
        return RunTokenizer(ByteTokenizer(), tokens.eod if tokens else ByteTokenizer.eod_id, "byte")
    return RunTokenizer(tok, tok.eod_id, "sentencepiece")


def encode_for_model(run_tok: RunTokenizer, text: str, model: ModelConfig) -> list[int]:
    """Token ids of `text` (the last max_seq_len), each checked against the model's vocabulary."""
    if not text:
        raise ValueError("text = '': expected at least one character")
    ids = run_tok.tokenizer.encode(text)[-model.max_seq_len:]
    bad = [i for i in ids if not 0 <= i < model.vocab_size]
    if bad:
        raise ValueError(f"text encodes to token {bad[0]}, outside the model's vocabulary (vocab_size "
                         f"{model.vocab_size}): the tokenizer does not fit this model")
    return ids


def parse_token_ids(text: str, vocab_size: int, max_len: int) -> list[int]:
    """"5,17,42" -> [5, 17, 42], each a token id of the model."""
    try:
        ids = [int(p) for p in text.replace(" ", "").split(",") if p != ""]
    except ValueError:
        raise ValueError(f"--token-ids = {text!r}: expected comma-separated integers, e.g. 5,17,42") from None
    if not ids:
        raise ValueError(f"--token-ids = {text!r}: expected at least one token id")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"--token-ids: token {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if len(ids) > max_len:
        raise ValueError(f"--token-ids: {len(ids)} tokens, more than model.max_seq_len = {max_len}")
    return ids
