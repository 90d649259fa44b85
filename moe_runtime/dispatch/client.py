"""ExpertClient: one channel to one expert server, as a router worker holds per expert actor.

Every call carries the auth token and a deadline; a failed call raises ExpertCallError, which names the server,
the method, the layer and the step. Dispatch and Backward send and return codec frames (the envelope is added and
removed here); replies are views of the received message (no copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import grpc
import grpc.aio
from typing_extensions import Self

from moe_runtime.dispatch.chunks import ChunkError, FrameAssembler, chunk_messages
from moe_runtime.dispatch.codec import FrameError, decode_frame
from moe_runtime.dispatch.envelope import EnvelopeError, unwrap_frame, wrap_frame
from moe_runtime.dispatch.lane import LaneClient, LaneError
from moe_runtime.dispatch.proto import expert_pb2 as pb
from moe_runtime.dispatch.service import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    METHOD_BACKWARD,
    METHOD_BACKWARD_STREAM,
    METHOD_DISPATCH,
    METHOD_DISPATCH_STREAM,
    METHOD_END_STEP,
    METHOD_HEALTH,
    TOKEN_METADATA_KEY,
    auto_chunk_bytes,
    channel_options,
)
from moe_runtime.malloc import tune_malloc

__all__ = ["ExpertCallError", "ExpertClient", "ExpertFuture"]

_FRAME_METHODS = {"Dispatch": METHOD_DISPATCH, "Backward": METHOD_BACKWARD}
_STREAM_METHODS = {"Dispatch": METHOD_DISPATCH_STREAM, "Backward": METHOD_BACKWARD_STREAM}


class ExpertCallError(RuntimeError):
    """A data-plane call failed; names the server, the layer, the step and the gRPC status."""

    def __init__(
        self, address: str, method: str, layer: int | None, step: int | None, code: grpc.StatusCode | None,
        details: str,
    ):  # fmt: skip
        where = f"layer {layer}, step {step}" if layer is not None else "no frame context"
        status = code.name if code is not None else "BAD_REPLY"
        super().__init__(f"expert server {address}: {method} ({where}) failed with {status}: {details}")
        self.address, self.method, self.layer, self.step, self.code, self.details = (
            address, method, layer, step, code, details)  # fmt: skip

    def __reduce__(self):  # picklable across Ray (its __init__ takes the parts, not the message)
        return (type(self), (self.address, self.method, self.layer, self.step, self.code, self.details))


class ExpertFuture:
    """A Dispatch/Backward call. `result()` returns the reply's codec frame (a view, no copy) or raises
    ExpertCallError. Wraps a gRPC future, a chunked call's reply stream (`streamed`), or the outcome of a call
    already made (a reply or the RpcError), or a TCP lane call (dispatch/lane.py)."""

    __slots__ = ("_call", "_client", "_layer", "_method", "_outcome", "_step", "_streamed")

    def __init__(self, call: Any, client: ExpertClient, method: str, layer: int | None,
                 step: int | None, outcome: bytes | memoryview | BaseException | None = None,
                 streamed: bool = False):  # fmt: skip
        self._call, self._outcome, self._streamed = call, outcome, streamed
        self._client, self._method, self._layer, self._step = client, method, layer, step

    def result(self) -> memoryview:
        try:
            if self._call is None:
                if isinstance(self._outcome, BaseException):
                    raise self._outcome
                reply = self._outcome
            elif self._streamed:
                reply = self._client._assemble(self._call)
            else:
                reply = self._call.result()
        except grpc.RpcError as e:
            raise self._client._error(self._method, self._layer, self._step, e) from None
        except LaneError as e:
            raise ExpertCallError(self._client.address, self._method, self._layer, self._step, e.code,
                                  e.details) from None  # fmt: skip
        except ChunkError as e:
            raise ExpertCallError(
                self._client.address, self._method, self._layer, self._step, None, f"bad chunked reply: {e}"
            ) from None
        except (grpc.FutureCancelledError, asyncio.CancelledError):
            raise ExpertCallError(
                self._client.address, self._method, self._layer, self._step, grpc.StatusCode.CANCELLED, "cancelled"
            ) from None
        try:
            return unwrap_frame(reply)
        except EnvelopeError as e:
            raise ExpertCallError(
                self._client.address, self._method, self._layer, self._step, None, f"reply is not a Frame: {e}"
            ) from None

    def done(self) -> bool:
        return self._call is None or self._call.done()  # a reply stream: done once its last message arrived

    def cancel(self) -> bool:
        return self._call is not None and self._call.cancel()


class ExpertClient:
    """One channel to one expert server. Every call carries the token and a deadline of `deadline_s`.

    A frame that does not fit one message of `max_message_bytes` goes as a chunked stream (DispatchStream /
    BackwardStream, dispatch/chunks.py) of `auto_chunk_bytes(max_message_bytes)` messages, and its reply comes
    back the same way: a frame of any size crosses, bounded only by `max_frame_bytes` in total. Frames that fit
    stay one unary message. `chunk_bytes`: also stream every frame larger than this, in messages of this size
    (copying overlaps sending).

    `lane=True`: Dispatch and Backward go over the server's TCP lane (dispatch/lane.py: no gRPC copies, no
    message limit but `max_frame_bytes`) when its Health reply names one; gRPC otherwise. Errors are the same
    ExpertCallErrors with the same status codes either way."""

    _lane: LaneClient | None = None  # class defaults: a subclass that skips __init__ (a test's stand-in) has no lane
    _lane_known = True

    def __init__(
        self,
        address: str,
        auth_token: str,
        deadline_s: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        chunk_bytes: int | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        lane: bool = False,
    ):
        if chunk_bytes is not None and chunk_bytes < 1 << 12:
            raise ValueError(f"chunk_bytes = {chunk_bytes}: expected None or >= 4096")
        tune_malloc()
        self.address = address
        self.deadline_s = float(deadline_s)
        self.max_message_bytes = int(max_message_bytes)
        self.max_frame_bytes = int(max_frame_bytes)
        self.chunk_bytes = chunk_bytes
        # a unary message holds the frame and its 16-byte envelope; larger frames stream in chunks of this size
        self._unary_limit = self.max_message_bytes - 16
        self._chunk = chunk_bytes if chunk_bytes is not None else auto_chunk_bytes(self.max_message_bytes)
        self._metadata = ((TOKEN_METADATA_KEY, auth_token),)
        self._auth_token = auth_token
        self.lane = lane
        self._lane: LaneClient | None = None
        self._lane_known = not lane  # the server's lane port is asked for (Health) at the first frame call
        self._lane_lock = threading.Lock()
        self._channel = grpc.insecure_channel(address, options=channel_options(self.max_message_bytes))
        raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
        self._stubs = {name: self._unary(method, **raw) for name, method in _FRAME_METHODS.items()}
        self._stream_stubs = {name: self._channel.stream_stream(method, **raw)
                              for name, method in _STREAM_METHODS.items()}  # fmt: skip
        # grpc.aio channel for fan_out: created on first use inside the loop that runs it, closed on that loop
        self._aio_channel: grpc.aio.Channel | None = None
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        self._aio_stubs: dict[str, Any] = {}
        self._aio_stream_stubs: dict[str, Any] = {}
        self._health = self._unary(
            METHOD_HEALTH, request_serializer=pb.HealthRequest.SerializeToString,
            response_deserializer=pb.HealthReply.FromString,
        )  # fmt: skip
        self._end_step = self._unary(
            METHOD_END_STEP, request_serializer=pb.EndStepRequest.SerializeToString,
            response_deserializer=pb.EndStepReply.FromString,
        )  # fmt: skip

    def uses_lane(self) -> bool:
        """Whether `call` goes over the TCP lane (or may: the server has not been asked yet). Such a call is sent on
        the caller's thread and read when its `result()` is asked for (fan_out does not hand it to the loop)."""
        return self._lane is not None or not self._lane_known

    def lane_client(self) -> LaneClient | None:
        """The server's TCP lane, asked for once (a Health call; raises ExpertCallError if that fails, and asks
        again next time); None when this client has `lane=False` or the server has no lane."""
        if not self._lane_known:
            with self._lane_lock:
                if not self._lane_known:
                    port = self.health().lane_port
                    if port:
                        host = self.address.rpartition(":")[0]
                        self._lane = LaneClient(f"{host}:{port}", self._auth_token, self.deadline_s,
                                                self.max_frame_bytes)  # fmt: skip
                    self._lane_known = True
        return self._lane

    def _unary(self, method: str, **kw: Any) -> grpc.UnaryUnaryMultiCallable:
        try:  # registered methods skip a per-call method lookup (grpcio >= 1.63)
            return self._channel.unary_unary(method, _registered_method=True, **kw)
        except TypeError:
            return self._channel.unary_unary(method, **kw)

    def _error(self, method: str, layer: int | None, step: int | None, e: grpc.RpcError) -> ExpertCallError:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = e.details() if hasattr(e, "details") else str(e)
        return ExpertCallError(self.address, method, layer, step, code, details or "")

    @staticmethod
    def _context(frame: bytes | memoryview | list, layer: int | None, step: int | None,
                 wrapped: bool = False) -> tuple[int | None, int | None]:  # fmt: skip
        """layer/step as given, else read from the frame (`wrapped`: a `Frame` message, or its parts: a list)."""
        if layer is None or step is None:
            if isinstance(frame, list):
                frame = b"".join(frame)
            try:
                h = decode_frame(unwrap_frame(frame) if wrapped else frame, out_dtype=None).header
                return h.layer, h.step
            except (FrameError, EnvelopeError):
                pass
        return layer, step

    def call(self, method: str, frame: bytes | list, *, layer: int | None = None, step: int | None = None,
             wait: bool = False, wrapped: bool = False) -> ExpertFuture:  # fmt: skip
        """Send a codec frame to "Dispatch" or "Backward". layer/step name the call in errors (read from the frame
        when omitted). `wait=True` makes the call on this thread and returns it completed: for a lone call it saves
        the hand-off from gRPC's polling thread to this one. `wrapped`: `frame` already is a `Frame` message
        (encode_frame(..., lead=envelope_prefix): no second copy for the envelope); a list: that message as the
        buffers that make it up (codec.encode_frame_parts, wrapped), sent on the lane without joining them."""
        if self.uses_lane():
            try:
                lane = self.lane_client()
            except ExpertCallError as e:  # the server's Health failed: this call fails the same way, named as itself
                layer, step = self._context(frame, layer, step, wrapped)
                return ExpertFuture(None, self, method, layer, step, ExpertCallError(
                    self.address, method, layer, step, e.code, f"asking the server for its lane: {e.details}"))
            if lane is not None:
                return self._lane_call(lane, method, frame, layer, step, wait, wrapped)
        if isinstance(frame, list):  # parts meant for a lane the server does not have
            frame = b"".join(frame)
        stub = self._stubs[method]
        message = frame if wrapped else None
        streams = self.streams(frame, wrapped)
        if wrapped and (streams or layer is None or step is None):  # the frame itself is needed
            frame = unwrap_frame(frame)
        if layer is None or step is None:
            layer, step = self._context(frame, layer, step)
        if streams:
            replies = self._stream_stubs[method](chunk_messages(frame, self._chunk), timeout=self.deadline_s,
                                                 metadata=self._metadata)  # fmt: skip
            future = ExpertFuture(replies, self, method, layer, step, streamed=True)
            if wait:
                try:
                    outcome: bytes | memoryview | BaseException = self._assemble(replies)
                except (grpc.RpcError, ChunkError) as e:
                    outcome = e if isinstance(e, grpc.RpcError) else ExpertCallError(
                        self.address, method, layer, step, None, f"bad chunked reply: {e}")
                return ExpertFuture(None, self, method, layer, step, outcome)
            return future
        if message is None:
            message = wrap_frame(frame)
        if not wait:
            call = stub.future(message, timeout=self.deadline_s, metadata=self._metadata)
            return ExpertFuture(call, self, method, layer, step)
        try:
            outcome = stub(message, timeout=self.deadline_s, metadata=self._metadata)
        except grpc.RpcError as e:
            outcome = e
        return ExpertFuture(None, self, method, layer, step, outcome)

    def _lane_call(self, lane: LaneClient, method: str, frame: bytes | list, layer: int | None, step: int | None,
                   wait: bool, wrapped: bool) -> ExpertFuture:  # fmt: skip
        layer, step = self._context(frame, layer, step, wrapped)
        if isinstance(frame, list):
            call = lane.call(method, None, parts=frame)
        else:
            call = lane.call(method, frame if wrapped else wrap_frame(frame))
        if not wait:
            return ExpertFuture(call, self, method, layer, step)
        try:
            outcome: bytes | memoryview | BaseException = call.result()
        except LaneError as e:
            outcome = e
        return ExpertFuture(None, self, method, layer, step, outcome)

    def streams(self, frame: bytes | memoryview, wrapped: bool = False) -> bool:
        """Whether `frame` goes chunked: it does not fit one message, or is larger than chunk_bytes. `wrapped`:
        `frame` is a `Frame` message (16 bytes of envelope in front). Never on the lane (no message limit)."""
        if self._lane is not None:
            return False
        n = len(frame) - (16 if wrapped else 0)
        return n > self._unary_limit or (self.chunk_bytes is not None and n > self.chunk_bytes)

    def wire_message(self, frame: bytes, wrapped: bool = False) -> bytes | list[bytes]:
        """What call_async sends for `frame`: one wrapped message, or its chunk messages (a list) when it streams.
        Built on the caller's thread, so the event loop's thread only does I/O. `wrapped`: as in `call`."""
        if self.streams(frame, wrapped):
            return list(chunk_messages(unwrap_frame(frame) if wrapped else frame, self._chunk))
        return frame if wrapped else wrap_frame(frame)

    def _assemble(self, replies: Any) -> memoryview:
        """The reply stream of a chunked call as one `Frame` message; raises grpc.RpcError or ChunkError."""
        assembler = FrameAssembler(self.max_frame_bytes)
        for message in replies:
            assembler.add(message)
        return assembler.message()

    async def call_async(self, method: str, message: bytes | list[bytes]) -> bytes | memoryview:
        """One "Dispatch"/"Backward" call on grpc.aio from the running event loop (fan_out's); `message` is from
        wire_message (wrapped, or chunk messages). Returns the raw reply; raises grpc.RpcError (ChunkError for a
        malformed chunked reply)."""
        if self._aio_channel is None:
            self._aio_loop = asyncio.get_running_loop()
            self._aio_channel = grpc.aio.insecure_channel(self.address,
                                                          options=channel_options(self.max_message_bytes))
            self._aio_stubs = {name: self._aio_channel.unary_unary(m) for name, m in _FRAME_METHODS.items()}
            self._aio_stream_stubs = {name: self._aio_channel.stream_stream(m) for name, m in _STREAM_METHODS.items()}
        if isinstance(message, list):
            call = self._aio_stream_stubs[method](iter(message), timeout=self.deadline_s, metadata=self._metadata)
            assembler = FrameAssembler(self.max_frame_bytes)
            async for reply in call:
                assembler.add(reply)
            return assembler.message()
        return await self._aio_stubs[method](message, timeout=self.deadline_s, metadata=self._metadata)

    def dispatch(self, frame: bytes, *, layer: int | None = None, step: int | None = None,
                 wait: bool = False) -> ExpertFuture:  # fmt: skip
        """Send a "dispatch" codec frame; `.result()` is the "result" frame."""
        return self.call("Dispatch", frame, layer=layer, step=step, wait=wait)

    def backward(self, frame: bytes, *, layer: int | None = None, step: int | None = None,
                 wait: bool = False) -> ExpertFuture:  # fmt: skip
        """Send a "backward" codec frame (grad of the outputs); `.result()` is the "grad" frame."""
        return self.call("Backward", frame, layer=layer, step=step, wait=wait)

    def health(self) -> pb.HealthReply:
        try:
            return self._health(pb.HealthRequest(), timeout=self.deadline_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error("Health", None, None, e) from None

    def end_step(self, step: int, abort: bool = False) -> pb.EndStepReply:
        try:
            return self._end_step(
                pb.EndStepRequest(step=step, abort=abort), timeout=self.deadline_s, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise self._error("EndStep", None, step, e) from None

    def close(self) -> None:
        if self._lane is not None:
            self._lane.close()
        self._channel.close()
        if self._aio_channel is not None:
            channel, loop, self._aio_channel = self._aio_channel, self._aio_loop, None
            with contextlib.suppress(Exception):  # best effort: the loop may be gone at interpreter exit
                asyncio.run_coroutine_threadsafe(channel.close(), loop).result(10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
