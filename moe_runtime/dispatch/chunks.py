"""Chunked frames: one codec frame as a stream of `Frame` messages of at most `chunk_bytes` each, so that a frame of
any size crosses gRPC (the max message length bounds each message, never the frame), and the sender's copy into
each message overlaps the transfer of the previous one (gRPC consumes the request iterator on its own thread).

Wire (protos/expert.proto, DispatchStream / BackwardStream, both directions): the `data` fields of the messages,
concatenated, are exactly one codec frame; the first message holds at least the frame's prefix and whole header,
so the receiver learns the total size (`codec.frame_nbytes`) and checks it against its bound on one frame
(`max_frame_bytes`, service.DEFAULT_MAX_FRAME_BYTES: a guard against a buggy peer, not the message limit) before
allocating. The receiver copies each chunk into one buffer with the 16-byte `Frame` envelope in front
(`FrameAssembler`): the same bytes a unary call delivers, so the server runs its unary handler on it unchanged.

API for callers: `ExpertClient` streams every frame that does not fit one message (automatically, in chunks of
`service.auto_chunk_bytes(max_message_bytes)`), and with `chunk_bytes=N` every frame larger than N; the server
answers a streamed request with a streamed reply and always offers both the unary and the streamed methods.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from moe_runtime.dispatch.codec import FrameError, frame_header_nbytes, frame_nbytes
from moe_runtime.dispatch.envelope import EnvelopeError, envelope_prefix, unwrap_frame, wrap_frame

__all__ = ["DEFAULT_CHUNK_BYTES", "ChunkError", "FrameAssembler", "chunk_messages"]

DEFAULT_CHUNK_BYTES = 1 << 20
_ENVELOPE = 16


class ChunkError(ValueError):
    """A chunked frame is malformed: names what and where."""


def chunk_messages(frame: bytes | memoryview, chunk_bytes: int) -> Iterator[bytes]:
    """`frame` (a codec frame) as serialized `Frame` messages of <= chunk_bytes of data each (the first holds the
    whole header, so it may be longer). Lazy: each message (one copy of its bytes) is built when gRPC asks for it,
    so the copy overlaps the sending of the one before."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes = {chunk_bytes}: expected > 0")
    mv = memoryview(frame).cast("B") if not isinstance(frame, bytes) else memoryview(frame)
    n = mv.nbytes
    first = min(n, max(chunk_bytes, frame_header_nbytes(mv)))
    yield wrap_frame(mv[:first])
    for off in range(first, n, chunk_bytes):
        yield wrap_frame(mv[off : off + chunk_bytes])


class FrameAssembler:
    """Receives the messages of one chunked frame (`add`), then gives it as one `Frame` message (`message`).
    `max_bytes` bounds the whole frame (the receiver's max_frame_bytes), not a message."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._buf: torch.Tensor | None = None  # uint8 [16 + total]: envelope + frame
        self._view: memoryview | None = None
        self._filled = 0
        self._total = 0
        self.messages = 0
        self.largest_chunk = 0  # data bytes of the largest message: the sender's chunk size

    def add(self, message: bytes | memoryview) -> None:
        try:
            data = unwrap_frame(message)
        except EnvelopeError as e:
            raise ChunkError(f"chunk {self.messages} is not a serialized Frame message: {e}") from None
        if self._view is None:
            try:
                total = frame_nbytes(data)
            except FrameError as e:
                raise ChunkError(f"chunk 0: {e}") from None
            if total > self.max_bytes:
                raise ChunkError(f"chunked frame declares {total} bytes: exceeds the limit of {self.max_bytes}")
            self._total = total
            try:
                self._buf = torch.empty(_ENVELOPE + total, dtype=torch.uint8)
            except RuntimeError as e:  # out of memory: the stream is refused, the receiver goes on
                raise ChunkError(f"chunked frame declares {total} bytes: cannot allocate them ({e})") from None
            self._view = memoryview(self._buf.numpy())
            self._view[:_ENVELOPE] = envelope_prefix(total)
        n = data.nbytes
        if self._filled + n > self._total:
            raise ChunkError(f"chunk {self.messages} brings the frame to {self._filled + n} bytes: its header "
                             f"declares {self._total}")
        self._view[_ENVELOPE + self._filled : _ENVELOPE + self._filled + n] = data
        self._filled += n
        self.messages += 1
        self.largest_chunk = max(self.largest_chunk, n)

    def message(self) -> memoryview:
        """The whole frame inside a `Frame` envelope (what a unary call would have received). Raises ChunkError
        when no chunk came or the frame is incomplete."""
        if self._view is None:
            raise ChunkError("the stream ended before its first chunk")
        if self._filled != self._total:
            raise ChunkError(f"the stream ended after {self._filled} of the frame's {self._total} bytes")
        return self._view
