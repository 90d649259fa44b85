"""Text in, next-token predictions out: byte-level encoding shared by `moe-runtime forward` and the demo."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_runtime.data import BOS
from moe_runtime.generation.byte_tokenizer import token_repr


def encode_text(text: str, max_len: int) -> torch.Tensor:
    """[1, S] long: BOS + the UTF-8 bytes, keeping the last max_len tokens."""
    if not text:
        raise ValueError("text = '': expected at least one character")
    ids = [BOS, *text.encode("utf-8")]
    return torch.tensor([ids[-max_len:]], dtype=torch.long)


@dataclass(frozen=True)
class Prediction:
    token: int
    text: str
    prob: float


def next_token_predictions(logits_bsv: torch.Tensor, k: int = 5) -> list[Prediction]:
    """Top-k next tokens after the last position of the first sequence."""
    probs = torch.softmax(logits_bsv[0, -1].float(), dim=-1)
    top = torch.topk(probs, k)
    return [Prediction(int(t), token_repr(int(t)), float(p)) for p, t in zip(top.values, top.indices)]
