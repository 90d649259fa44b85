from __future__ import annotations

from moe_runtime.data import BOS, EOS, PAD
from moe_runtime.generation.byte_tokenizer import ByteTokenizer


def test_byte_tokenizer_round_trip_and_special_tokens_decode_to_nothing():
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids[0] == BOS and tok.decode(ids + [EOS, PAD]) == "héllo"
    assert tok.eod_id == EOS
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"  # incomplete character until its last byte
