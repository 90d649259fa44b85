"""The presets' byte-level vocabulary (moe_runtime.data): token i < 256 is byte i; BOS, EOS (end of document)
and PAD are special and decode to nothing. Checkpoints bring their own (moe_runtime/checkpoint/tokenizer.py)."""

from __future__ import annotations

from collections.abc import Sequence

from moe_runtime.data import BOS, EOS


class ByteTokenizer:
    eod_id = EOS

    def encode(self, text: str) -> list[int]:
        """BOS + the UTF-8 bytes."""
        return [BOS, *text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """The bytes as UTF-8; an incomplete trailing character reads as U+FFFD until its last byte arrives."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
