"""The presets' byte-level vocabulary (moe_runtime.data): token i < 256 is byte i; BOS, EOS (end of document)
and PAD are special and decode to nothing. Checkpoints bring their own (moe_runtime/checkpoint/tokenizer.py)."""

from __future__ import annotations

from collections.abc import Sequence

from moe_runtime.data import BOS, EOS, PAD


class ByteTokenizer:
    eod_id = EOS

    def encode(self, text: str) -> list[int]:
        """BOS + the UTF-8 bytes."""
        return [BOS, *text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """The bytes as UTF-8; an incomplete trailing character reads as U+FFFD until its last byte arrives."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def token_repr(token: int) -> str:
    """One byte-level token as printable text, for a table of predictions ('\\x0a', '<eos>', ...)."""
    if token < 256:
        ch = bytes([token]).decode("latin-1")
        return repr(ch)[1:-1] if ch.isprintable() and ch != "\\" else f"\\x{token:02x}"
    return {BOS: "<bos>", EOS: "<eos>", PAD: "<pad>"}.get(token, f"<{token}>")
