"""The protobuf `Frame` envelope (protos/expert.proto) around a codec frame, built and parsed by hand.

Dispatch and Backward are registered with raw-bytes (de)serializers, so protobuf never copies the payload: the
codec frame is decoded as a view of the received message. `wrap_frame` writes `pad` (field 15) before `data` so
the codec frame starts 16 bytes into the message, keeping the codec's promise that tensors are at least 16-byte
aligned (gRPC hands us `bytes` whose payload is 16- but not 64-byte aligned). A client generated from the .proto
(writes `data` only) works too: `unwrap_frame` accepts any valid `Frame` encoding. The envelope costs one more
copy of the payload per message (`envelope_ms` in benchmarks/transport.py); avoiding it needs the codec to write
the envelope into its own join.
"""

from __future__ import annotations

import functools

__all__ = ["EnvelopeError", "envelope_prefix", "unwrap_frame", "wrap_frame"]

_DATA_TAG = 0x0A  # field 1, wire type 2 (length-delimited)
_PAD_TAG = 0x7A  # field 15, wire type 2
_ALIGN = 16


class EnvelopeError(ValueError):
    """The message is not a serialized `Frame`."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(mv: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    end = min(len(mv), pos + 10)
    while pos < end:
        b = mv[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
    raise EnvelopeError("truncated or overlong varint")


@functools.lru_cache(maxsize=4096)  # a pure function of the size, called twice per data-plane call (send, reply)
def envelope_prefix(data_nbytes: int) -> bytes:
    """The 16 bytes a serialized `Frame{pad, data}` starts with, for `data` of data_nbytes bytes."""
    length = _varint(data_nbytes)
    pad = _ALIGN - 3 - len(length)  # pad tag, pad length (1 byte), pad bytes, data tag, data length
    return b"".join((bytes((_PAD_TAG, pad)), bytes(pad), bytes((_DATA_TAG,)), length))


def wrap_frame(frame: bytes | memoryview) -> bytes:
    """Serialize `Frame{pad, data=frame}` with `data` starting exactly 16 bytes into the message."""
    return b"".join((envelope_prefix(len(frame) if isinstance(frame, bytes) else memoryview(frame).nbytes), frame))


def unwrap_frame(message: bytes | memoryview) -> memoryview:
    """The `data` field of a serialized `Frame`, as a view (no copy). Accepts any valid encoding: fields in any
    order, unknown fields skipped, last `data` wins (protobuf semantics). Raises EnvelopeError."""
    mv = memoryview(message)
    n = len(mv)
    # fast path: our own 16-byte layout (pad field, then data running to the end), parsed from one small bytes copy
    # of the head (indexing bytes is cheaper than indexing a memoryview); anything else takes the general parser
    if n >= _ALIGN:
        head = mv[:_ALIGN].tobytes()
        pos = 2 + head[1]
        if head[0] == _PAD_TAG and head[1] < 0x80 and pos < _ALIGN - 1 and head[pos] == _DATA_TAG:
            length = shift = 0
            for pos in range(pos + 1, _ALIGN):
                b = head[pos]
                length |= (b & 0x7F) << shift
                if not b & 0x80:
                    if pos + 1 + length == n:
                        return mv[pos + 1 :]
                    break
                shift += 7
    pos = 0
    start = stop = 0
    while pos < n:
        key, pos = _read_varint(mv, pos)
        field_no, wire_type = key >> 3, key & 7
        if field_no == 0:
            raise EnvelopeError(f"field number 0 at byte {pos}")
        if wire_type == 2:
            length, pos = _read_varint(mv, pos)
            if length > n - pos:
                raise EnvelopeError(f"field {field_no} declares {length} bytes but only {n - pos} remain")
            if field_no == 1:
                start, stop = pos, pos + length
            pos += length
        elif wire_type == 0:
            _, pos = _read_varint(mv, pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            if pos > n:
                raise EnvelopeError(f"field {field_no} is truncated")
        else:
            raise EnvelopeError(f"field {field_no} has unsupported wire type {wire_type}")
    return mv[start:stop]
