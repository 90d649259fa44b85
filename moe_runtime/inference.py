"""Text in, next-token predictions out: byte-level encoding shared by `moe-runtime forward` and the demo."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_runtime.data import BOS


def encode_text(text: str, max_len: int) -> torch.Tensor:
    """[1, S] long: BOS + the UTF-8 bytes, keeping the last max_len tokens."""
    if not text:
        raise ValueError("text = '': expected at least one character")
    ids = [BOS, *text.encode("utf-8")]
    return torch.tensor([ids[-max_len:]], dtype=torch.long)


def token_repr(token: int) -> str:
    if token < 256:
        ch = bytes([token]).decode("latin-1")
        return repr(ch)[1:-1] if ch.isprintable() and ch != "\\" else f"\\x{token:02x}"
    return {256: "<bos>", 257: "<eos>", 258: "<pad>"}.get(token, f"<{token}>")


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


def greedy_continuation(logits_fn, tokens_1s: torch.Tensor, new_tokens: int, max_len: int) -> str:
    """Greedy decoding by re-running the full forward (no KV cache): fine for short demos."""
    out = []
    for _ in range(new_tokens):
        nxt = int(logits_fn(tokens_1s[:, -max_len:])[0, -1].argmax())
        out.append(nxt)
        tokens_1s = torch.cat([tokens_1s, torch.tensor([[nxt]])], dim=1)
    return bytes(t for t in out if t < 256).decode("utf-8", errors="replace")
