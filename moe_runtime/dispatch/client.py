"""ExpertClient: one channel to one expert server, as a router worker holds per expert actor.

Every call carries the auth token and a deadline; a failed call raises ExpertCallError, which names the server,
the method, the layer and the step. Dispatch and Backward send and return codec frames (the envelope is added and
removed here); replies are views of the received message (no copy).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
import grpc.aio
from typing_extensions import Self

from moe_runtime.dispatch.codec import FrameError, decode_frame
from moe_runtime.dispatch.envelope import EnvelopeError, unwrap_frame, wrap_frame
from moe_runtime.dispatch.proto import expert_pb2 as pb
from moe_runtime.dispatch.service import (
    DEFAULT_MAX_MESSAGE_BYTES,
    METHOD_BACKWARD,
    METHOD_DISPATCH,
    METHOD_END_STEP,
    METHOD_HEALTH,
    TOKEN_METADATA_KEY,
    channel_options,
)
from moe_runtime.malloc import tune_malloc

__all__ = ["ExpertCallError", "ExpertClient", "ExpertFuture"]

_FRAME_METHODS = {"Dispatch": METHOD_DISPATCH, "Backward": METHOD_BACKWARD}


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
    ExpertCallError. Wraps a gRPC future, or the outcome of a call already made (a reply or the RpcError)."""

    __slots__ = ("_call", "_client", "_layer", "_method", "_outcome", "_step")

    def __init__(self, call: grpc.Future | None, client: ExpertClient, method: str, layer: int | None,
                 step: int | None, outcome: bytes | BaseException | None = None):  # fmt: skip
        self._call, self._outcome = call, outcome
        self._client, self._method, self._layer, self._step = client, method, layer, step

    def result(self) -> memoryview:
        try:
            if self._call is None:
                if isinstance(self._outcome, BaseException):
                    raise self._outcome
                reply = self._outcome
            else:
                reply = self._call.result()
        except grpc.RpcError as e:
            raise self._client._error(self._method, self._layer, self._step, e) from None
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
        return self._call is None or self._call.done()

    def cancel(self) -> bool:
        return self._call is not None and self._call.cancel()


class ExpertClient:
    """One channel to one expert server. Every call carries the token and a deadline of `deadline_s`."""

    def __init__(
        self,
        address: str,
        auth_token: str,
        deadline_s: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        tune_malloc()
        self.address = address
        self.deadline_s = float(deadline_s)
        self.max_message_bytes = int(max_message_bytes)
        self._metadata = ((TOKEN_METADATA_KEY, auth_token),)
        self._channel = grpc.insecure_channel(address, options=channel_options(self.max_message_bytes))
        raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
        self._stubs = {name: self._unary(method, **raw) for name, method in _FRAME_METHODS.items()}
        # grpc.aio channel for fan_out: created on first use inside the loop that runs it, closed on that loop
        self._aio_channel: grpc.aio.Channel | None = None
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        self._aio_stubs: dict[str, Any] = {}
        self._health = self._unary(
            METHOD_HEALTH, request_serializer=pb.HealthRequest.SerializeToString,
            response_deserializer=pb.HealthReply.FromString,
        )  # fmt: skip
        self._end_step = self._unary(
            METHOD_END_STEP, request_serializer=pb.EndStepRequest.SerializeToString,
            response_deserializer=pb.EndStepReply.FromString,
        )  # fmt: skip

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
    def _context(frame: bytes, layer: int | None, step: int | None) -> tuple[int | None, int | None]:
        if layer is None or step is None:
            try:
                h = decode_frame(frame, out_dtype=None).header
                return h.layer, h.step
            except FrameError:
                pass
        return layer, step

    def call(self, method: str, frame: bytes, *, layer: int | None = None, step: int | None = None,
             wait: bool = False) -> ExpertFuture:  # fmt: skip
        """Send a codec frame to "Dispatch" or "Backward". layer/step name the call in errors (read from the frame
        when omitted). `wait=True` makes the call on this thread and returns it completed: for a lone call it saves
        the hand-off from gRPC's polling thread to this one."""
        stub = self._stubs[method]
        if layer is None or step is None:
            layer, step = self._context(frame, layer, step)
        message = wrap_frame(frame)
        if not wait:
            call = stub.future(message, timeout=self.deadline_s, metadata=self._metadata)
            return ExpertFuture(call, self, method, layer, step)
        try:
            outcome: bytes | grpc.RpcError = stub(message, timeout=self.deadline_s, metadata=self._metadata)
        except grpc.RpcError as e:
            outcome = e
        return ExpertFuture(None, self, method, layer, step, outcome)

    async def call_async(self, method: str, message: bytes) -> bytes:
        """One "Dispatch"/"Backward" call on grpc.aio from the running event loop (fan_out's); `message` is already
        wrapped (wrap_frame), so the loop thread only does I/O. Returns the raw reply; raises grpc.RpcError."""
        if self._aio_channel is None:
            self._aio_loop = asyncio.get_running_loop()
            self._aio_channel = grpc.aio.insecure_channel(self.address,
                                                          options=channel_options(self.max_message_bytes))
            self._aio_stubs = {name: self._aio_channel.unary_unary(m) for name, m in _FRAME_METHODS.items()}
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
        self._channel.close()
        if self._aio_channel is not None:
            channel, loop, self._aio_channel = self._aio_channel, self._aio_loop, None
            with contextlib.suppress(Exception):  # best effort: the loop may be gone at interpreter exit
                asyncio.run_coroutine_threadsafe(channel.close(), loop).result(10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
