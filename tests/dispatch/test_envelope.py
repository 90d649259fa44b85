"""The Frame envelope: a real protobuf `Frame` with the codec frame 16 bytes in, parsed like protobuf parses it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_runtime.dispatch.envelope import EnvelopeError, unwrap_frame, wrap_frame
from moe_runtime.dispatch.proto import expert_pb2 as pb


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16383, 16384, 1 << 20])
def test_envelope_is_a_frame_message_with_data_16_bytes_in(n):
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    msg = wrap_frame(data)
    assert len(msg) == n + 16 and msg[16:] == data  # aligned start: tensors keep the codec's alignment
    assert pb.Frame.FromString(msg).data == data  # protobuf agrees it is a Frame
    assert bytes(unwrap_frame(msg)) == data
    assert bytes(unwrap_frame(pb.Frame(data=data).SerializeToString())) == data  # generated-client layout


def test_envelope_skips_unknown_fields_and_rejects_garbage():
    inner = b"\x08\x96\x01" + b"\x0a\x03abc" + b"\x15\x01\x02\x03\x04" + b"\x19" + bytes(8)  # varint, fixed32/64
    assert bytes(unwrap_frame(inner)) == b"abc"
    assert bytes(unwrap_frame(b"\x0a\x01x\x0a\x02yz")) == b"yz"  # last one wins, like protobuf
    for bad, msg in [
        (b"\x0a\x05ab", "declares 5 bytes but only 2 remain"),
        (b"\x0a", "truncated or overlong varint"),
        (b"\x0b", "unsupported wire type 3"),
        (b"\x00", "field number 0"),
        (b"\x0a" + b"\xff" * 11, "truncated or overlong varint"),
        (b"\x15\x01", "field 2 is truncated"),
    ]:
        with pytest.raises(EnvelopeError, match=msg):
            unwrap_frame(bad)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(st.binary(max_size=64), st.binary(max_size=40), st.binary(max_size=40))
def test_envelope_parser_agrees_with_protobuf(junk, data, pad):
    """Any bytes: unwrap_frame returns protobuf's `data` or raises EnvelopeError, nothing else."""
    for message in (junk, pb.Frame(data=data, pad=pad).SerializeToString(), wrap_frame(data), wrap_frame(data) + junk):
        try:
            expected = pb.Frame.FromString(message).data
        except Exception:  # noqa: BLE001  (protobuf's DecodeError and friends: not a Frame)
            expected = None
        try:
            got = bytes(unwrap_frame(message))
        except EnvelopeError:
            got = None
        if expected is not None and got is not None:
            assert got == expected
        else:  # we may reject what protobuf accepts only for wire types/groups we do not parse
            assert got is None, (message, got)
