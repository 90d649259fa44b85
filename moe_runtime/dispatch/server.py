"""ExpertServer: the gRPC end of ExpertService an expert actor runs, over the shard state it is given.

Contract: protos/expert.proto. Dispatch and Backward carry one codec frame (dispatch/codec.py) in a `Frame`
envelope (dispatch/envelope.py). The server checks the auth token, decodes and validates each request, rejects bad
ones with a status code and a message naming the problem, hands the rows to its `ExpertBackend` (the actor's
shards: runtime/expert_shards.py) and encodes the reply; it counts what it served. It owns no expert state: the
backend computes, keeps activations for backward and frees them at EndStep.

Concurrency: the gRPC thread pool calls the handlers concurrently; the backend must be safe for that (it is
called with no lock of the server's held). The server's own lock guards only its counters.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import grpc
import torch
from typing_extensions import Self

from moe_runtime.dispatch.chunks import ChunkError, FrameAssembler, chunk_messages
from moe_runtime.dispatch.codec import Frame, FrameError, FrameHeader, decode_frame, encode_answer, encode_answer_parts
from moe_runtime.dispatch.envelope import EnvelopeError, envelope_prefix, unwrap_frame
from moe_runtime.dispatch.lane import LaneContext, LaneServer, init_compute_thread
from moe_runtime.dispatch.proto import expert_pb2 as pb
from moe_runtime.dispatch.service import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    SERVICE,
    TOKEN_METADATA_KEY,
    auto_chunk_bytes,
    channel_options,
)
from moe_runtime.malloc import tune_malloc
from moe_runtime.placement import ShardKey

__all__ = [
    "ActivationKey",
    "ActivationsMissing",
    "BackendSummary",
    "ExpertBackend",
    "ExpertServer",
    "SegmentsMismatch",
]


class ActivationKey(NamedTuple):
    """What a forward's saved activations are kept under until its backward (one per router worker `src`)."""

    step: int
    mb: int
    layer: int
    src: int


@dataclass(frozen=True)
class BackendSummary:
    """The backend's side of a Health reply."""

    placement_version: int
    num_shards: int
    saved_entries: int
    saved_bytes: int


class ActivationsMissing(LookupError):
    """Backward found no saved forward under its key (answered FAILED_PRECONDITION)."""

    def __init__(self, key: ActivationKey):
        super().__init__(
            f"no saved forward for step {key.step}, micro-batch {key.mb}, layer {key.layer}, src {key.src}: "
            "it was already consumed by a Backward, freed by EndStep, or never dispatched with save"
        )
        self.key = key


class SegmentsMismatch(ValueError):
    """Backward's segments differ from its forward's (answered INVALID_ARGUMENT; the saved entry is kept)."""

    def __init__(self, experts: Sequence[int], counts: Sequence[int], saved_experts: Sequence[int],
                 saved_counts: Sequence[int]):  # fmt: skip
        super().__init__(
            f"backward segments experts={list(experts)} counts={list(counts)} do not match the "
            f"forward's experts={list(saved_experts)} counts={list(saved_counts)}"
        )


class ExpertBackend(Protocol):
    """The shard state a server serves. Called from several gRPC threads at once.

    forward / backward raise KeyError((layer, expert)) for a shard that is not (or no longer) hosted; backward
    raises ActivationsMissing or SegmentsMismatch for a key it cannot answer.
    """

    @property
    def placement_version(self) -> int: ...

    @property
    def hosted(self) -> frozenset[ShardKey]: ...

    def hidden_size(self, layer: int, expert: int) -> int: ...

    def forward(self, layer: int, experts: Sequence[int], counts: Sequence[int], x_nd: torch.Tensor,
                save_as: ActivationKey | None) -> torch.Tensor:  # fmt: skip
        """y [rows, d] of expert experts[i] on segment i of x_nd (fp32, owned by the backend from now on: never a
        view of the request); keeps what backward needs under `save_as` unless None; counts the tokens."""
        ...

    def backward(self, layer: int, experts: Sequence[int], counts: Sequence[int], dy_nd: torch.Tensor,
                 saved_as: ActivationKey) -> torch.Tensor:  # fmt: skip
        """dx [rows, d] for the forward saved under `saved_as` (consumed), accumulating the weight grads."""
        ...

    def end_step(self, step: int) -> tuple[int, int]:
        """Free every saved activation of steps <= step: (entries, bytes)."""
        ...

    def abort_step(self, step: int) -> tuple[int, int]: ...

    def summary(self) -> BackendSummary: ...


@dataclass
class _Stats:
    requests: dict[str, int] = field(default_factory=lambda: {"dispatch": 0, "backward": 0})
    rejected: dict[str, int] = field(default_factory=dict)  # status code name -> count
    bytes_in: int = 0
    bytes_out: int = 0
    decode_s: float = 0.0
    compute_s: float = 0.0
    compute_cpu_s: float = 0.0  # CPU seconds of the handler thread in compute (torch runs on it: 1 thread)
    handler_cpu_s: float = 0.0  # CPU seconds of the handler thread, whole request (decode, compute, encode, ...)
    encode_s: float = 0.0

    def count(self, kind: str, bytes_in: int, bytes_out: int, decode_s: float, compute_s: float,
              encode_s: float, compute_cpu_s: float, handler_cpu_s: float) -> None:  # fmt: skip
        """One served request (call under the server lock)."""
        self.compute_cpu_s += compute_cpu_s
        self.handler_cpu_s += handler_cpu_s
        self.requests[kind] += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.decode_s += decode_s
        self.compute_s += compute_s
        self.encode_s += encode_s


class _Reject(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _reply(kind: str, h: FrameHeader, name: str, tensor: torch.Tensor, wire_dtype: torch.dtype,
           parts: bool) -> bytes | list[Any]:  # fmt: skip
    """A result/grad frame answering request header `h`, wrapped for the wire: one bytes (one copy, the envelope
    in it), or with `parts` the buffers that make it up (the lane sends them without a copy: dispatch/lane.py)."""
    if parts:
        return encode_answer_parts(kind, h, name, tensor, wire_dtype, lead=envelope_prefix)
    return encode_answer(kind, h, name, tensor, wire_dtype, lead=envelope_prefix)


def _nbytes(reply: bytes | list[Any]) -> int:
    return len(reply) if isinstance(reply, bytes) else sum(memoryview(p).nbytes for p in reply)


class ExpertServer:
    """Serves `backend` over gRPC on `host` (127.0.0.1 in local mode): Dispatch, Backward, Health, EndStep.

    The owning actor drives the backend's control methods in-process between steps; router workers reach the
    server through `ExpertClient`.
    """

    def __init__(
        self,
        backend: ExpertBackend,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        auth_token: str,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        check_finite: bool = False,
        threads: int = 4,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        lane: bool = True,
    ):
        if not auth_token:
            raise ValueError("auth_token is empty: the data plane needs a shared token")
        self.backend = backend
        self.host, self.port = host, port
        self._token = auth_token.encode()
        self.max_message_bytes = int(max_message_bytes)  # one gRPC message (a unary frame, or one chunk)
        self.max_frame_bytes = int(max_frame_bytes)  # one chunked frame in total (dispatch/chunks.py)
        self.check_finite = check_finite
        self.threads = threads
        self.lane = lane  # also serve Dispatch / Backward on a TCP lane (dispatch/lane.py); its port is in Health
        self._lane: LaneServer | None = None
        self.lane_port = 0
        self._lock = threading.Lock()
        self._stats = _Stats()
        self._server: grpc.Server | None = None
        self.address: str | None = None

    # -------------------------------------------------------------------------------- lifecycle

    def start(self) -> str:
        if self._server is not None:
            raise RuntimeError(f"ExpertServer already started at {self.address}")
        tune_malloc()
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="expert-grpc",
                                       initializer=init_compute_thread),  # fmt: skip
            options=channel_options(self.max_message_bytes) + [("grpc.so_reuseport", 0)],
        )
        server.add_generic_rpc_handlers((_TokenGate(self, self._handlers()),))
        port = server.add_insecure_port(f"{self.host}:{self.port}")
        if port == 0:
            raise RuntimeError(f"ExpertServer could not bind {self.host}:{self.port}")
        server.start()
        self._server, self.port = server, port
        self.address = f"{self.host}:{port}"
        if self.lane:
            self._lane = LaneServer(self._serve_lane, self._lane_token_problem, self.host,
                                    max_frame_bytes=self.max_frame_bytes, on_reject=self._count_reject)  # fmt: skip
            self.lane_port = self._lane.port
        return self.address

    def _handlers(self) -> list[grpc.GenericRpcHandler]:
        """The gRPC handlers this server registers (a subclass may add its own)."""
        raw: dict[str, Any] = {"request_deserializer": None, "response_serializer": None}
        return [grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Dispatch": grpc.unary_unary_rpc_method_handler(self._rpc_dispatch, **raw),
                "Backward": grpc.unary_unary_rpc_method_handler(self._rpc_backward, **raw),
                # chunked frames (dispatch/chunks.py): frames of any size, reassembled and served by the unary handler
                "DispatchStream": grpc.stream_stream_rpc_method_handler(self._rpc_dispatch_stream, **raw),
                "BackwardStream": grpc.stream_stream_rpc_method_handler(self._rpc_backward_stream, **raw),
                # raw bytes in, parsed by the handler: a malformed request is INVALID_ARGUMENT, not grpc's INTERNAL
                "Health": grpc.unary_unary_rpc_method_handler(
                    self._rpc_health, request_deserializer=None,
                    response_serializer=pb.HealthReply.SerializeToString,
                ),
                "EndStep": grpc.unary_unary_rpc_method_handler(
                    self._rpc_end_step, request_deserializer=None,
                    response_serializer=pb.EndStepReply.SerializeToString,
                ),
            },
        )]  # fmt: skip

    def stop(self, grace: float | None = None) -> None:
        if self._lane is not None:
            self._lane.stop()
            self._lane, self.lane_port = None, 0
        if self._server is not None:
            self._server.stop(grace).wait(timeout=10)
            self._server = None

    def __enter__(self) -> Self:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """What this server served: requests and rejects, bytes, and where the handler time went."""
        with self._lock:
            s = self._stats
            return {
                "address": self.address,
                "requests": dict(s.requests),
                "rejected": dict(s.rejected),
                "bytes_in": s.bytes_in,
                "bytes_out": s.bytes_out,
                "decode_s": s.decode_s,
                "compute_s": s.compute_s,
                "compute_cpu_s": s.compute_cpu_s,
                "handler_cpu_s": s.handler_cpu_s,
                "encode_s": s.encode_s,
            }

    # -------------------------------------------------------------------------------- request handling

    def _token_problem(self, metadata: Sequence[Any] | None) -> str | None:
        """Why the call's metadata does not authenticate it, or None when it does."""
        for item in metadata or ():
            if item.key == TOKEN_METADATA_KEY:
                value = item.value.encode() if isinstance(item.value, str) else item.value
                if hmac.compare_digest(value, self._token):
                    return None
                return f"metadata {TOKEN_METADATA_KEY!r} has a wrong token"
        return f"metadata {TOKEN_METADATA_KEY!r} is missing"

    def _lane_token_problem(self, token: bytes) -> str | None:
        """Why a lane connection's hello token does not authenticate it, or None when it does."""
        return None if hmac.compare_digest(token, self._token) else "lane hello has a wrong token"

    def _serve_lane(self, method: str, request: memoryview, context: LaneContext) -> bytes | list[Any]:
        """A lane request (authenticated at the connection's hello), served by the unary handlers; a lane frame is
        bounded by max_frame_bytes (it has no per-message limit) and arrives 64-byte aligned (no aligned copy)."""
        serve = self._serve_dispatch if method == "Dispatch" else self._serve_backward
        return serve(request, context, self.max_frame_bytes, parts=True)  # type: ignore[arg-type]

    def _check_token(self, context: grpc.ServicerContext) -> None:
        problem = self._token_problem(context.invocation_metadata())
        if problem is not None:
            raise _Reject(grpc.StatusCode.UNAUTHENTICATED, problem)

    def _count_reject(self, code: grpc.StatusCode) -> None:
        with self._lock:
            self._stats.rejected[code.name] = self._stats.rejected.get(code.name, 0) + 1

    def _reject(self, context: grpc.ServicerContext, err: _Reject) -> bytes:
        self._count_reject(err.code)
        context.set_code(err.code)
        context.set_details(str(err))
        return b""

    def _decode(self, request: bytes, kind: str, tensor: str, max_bytes: int
                ) -> tuple[Frame, torch.Tensor, torch.dtype]:  # fmt: skip
        backend = self.backend
        try:
            data = unwrap_frame(request)
        except EnvelopeError as e:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a serialized Frame message: {e}")
        try:
            frame = decode_frame(
                data,
                expected_kind=kind,
                hosted=backend.hosted,
                max_bytes=max_bytes,
                check_finite=self.check_finite,
                out_dtype=torch.float32,
            )
            h = frame.header
            if len(h.tensors) != 1 or h.tensors[0].name != tensor:
                names = [s.name for s in h.tensors]
                raise FrameError(f"tensors = {names}: a {kind} frame carries exactly one tensor named {tensor!r}")
            spec = h.tensors[0]
            if spec.dtype not in ("float32", "float16", "bfloat16"):
                raise FrameError(f"tensors[0].dtype = {spec.dtype!r}: expected float32, float16 or bfloat16")
            if len(spec.shape) != 2:
                raise FrameError(f"tensors[0].shape = {list(spec.shape)}: expected [rows, hidden]")
            for e in h.experts:
                d = backend.hidden_size(h.layer, e)
                if spec.shape[1] != d:
                    raise FrameError(
                        f"tensors[0].shape = {list(spec.shape)}: hidden {spec.shape[1]} but expert "
                        f"(layer {h.layer}, expert {e}) has hidden {d}"
                    )
            src = h.meta.get("src", 0)
            if not isinstance(src, int) or isinstance(src, bool) or src < 0:
                raise FrameError(f"meta['src'] = {src!r}: expected a non-negative int")
            save = h.meta.get("save", True)
            if not isinstance(save, bool):
                raise FrameError(f"meta['save'] = {save!r}: expected a bool")
        except FrameError as e:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except KeyError as e:  # a shard dropped between the hosted check and the lookup
            raise _Reject(grpc.StatusCode.FAILED_PRECONDITION, f"shard {e} is no longer hosted by this server")
        pv = backend.placement_version
        if h.pv != pv:
            raise _Reject(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"frame was routed with placement version {h.pv} but this server is at version {pv}: "
                "refresh the placement and re-plan",
            )
        return frame, frame.tensors[tensor], getattr(torch, spec.dtype)

    # Dispatch and Backward: the token was checked by _TokenGate before the request was read (every method, every
    # call), so the handlers do not check it again.

    def _rpc_dispatch(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self._serve_dispatch(request, context, self.max_message_bytes)

    def _rpc_backward(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self._serve_backward(request, context, self.max_message_bytes)

    def _serve_dispatch(self, request: bytes | memoryview, context: grpc.ServicerContext, max_bytes: int,
                        parts: bool = False) -> Any:  # fmt: skip  # bytes, or a list of buffers with `parts`
        try:
            t0, h0 = time.perf_counter(), time.thread_time()
            frame, x, wire_dtype = self._decode(request, "dispatch", "x", max_bytes)
            if x.dtype == wire_dtype and x.data_ptr() % 64:
                # an fp32 frame decodes to a view of the request, only 16-byte aligned (gRPC allocates the bytes):
                # MKL's sgemm is much slower on it (docs/measurements.md), and MKL's results may depend on the
                # alignment (its reproducibility notes): one copy into a fresh 64-byte-aligned tensor, as the
                # in-process oracle computes on. An aligned view is kept as it is (the saved activation then holds
                # the request, the same bytes a copy would).
                x = x.clone()
            t1 = time.perf_counter()
            h = frame.header
            src, save = int(h.meta.get("src", 0)), bool(h.meta.get("save", True))
            c1 = time.thread_time()
            y = self.backend.forward(h.layer, h.experts, h.counts, x,
                                     ActivationKey(h.step, h.mb, h.layer, src) if save else None)  # fmt: skip
            c2, t2 = time.thread_time(), time.perf_counter()
            reply = _reply("result", h, "y", y, wire_dtype, parts)
            t3 = time.perf_counter()
            with self._lock:
                self._stats.count("dispatch", len(request), _nbytes(reply), t1 - t0, t2 - t1, t3 - t2, c2 - c1,
                                  time.thread_time() - h0)
            return reply
        except KeyError as e:  # a shard dropped between the hosted check and the compute
            return self._reject(context, _Reject(grpc.StatusCode.FAILED_PRECONDITION, f"shard {e} was dropped"))
        except _Reject as err:
            return self._reject(context, err)

    def _serve_backward(self, request: bytes | memoryview, context: grpc.ServicerContext, max_bytes: int,
                        parts: bool = False) -> Any:  # fmt: skip  # as _serve_dispatch
        try:
            t0, h0 = time.perf_counter(), time.thread_time()
            frame, dy, wire_dtype = self._decode(request, "backward", "dy", max_bytes)
            t1 = time.perf_counter()
            h = frame.header
            key = ActivationKey(h.step, h.mb, h.layer, int(h.meta.get("src", 0)))
            c1 = time.thread_time()
            try:
                dx = self.backend.backward(h.layer, h.experts, h.counts, dy, key)
            except ActivationsMissing as e:
                raise _Reject(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            except SegmentsMismatch as e:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            c2, t2 = time.thread_time(), time.perf_counter()
            reply = _reply("grad", h, "dx", dx, wire_dtype, parts)
            t3 = time.perf_counter()
            with self._lock:
                self._stats.count("backward", len(request), _nbytes(reply), t1 - t0, t2 - t1, t3 - t2, c2 - c1,
                                  time.thread_time() - h0)
            return reply
        except KeyError as e:
            return self._reject(context, _Reject(grpc.StatusCode.FAILED_PRECONDITION, f"shard {e} was dropped"))
        except _Reject as err:
            return self._reject(context, err)

    def _rpc_dispatch_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        return self._serve_chunked(self._serve_dispatch, requests, context)

    def _rpc_backward_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        return self._serve_chunked(self._serve_backward, requests, context)

    def _serve_chunked(self, serve: Any, requests: Iterator[bytes], context: grpc.ServicerContext
                       ) -> Iterator[bytes]:  # fmt: skip
        """A chunked frame in, reassembled into the message a unary call gets, served as a unary one; the reply
        goes back chunked like the request (dispatch/chunks.py). The message limit bounds each chunk (gRPC
        enforces it); the frame as a whole is bounded by max_frame_bytes only."""
        try:
            self._check_token(context)
            assembler = FrameAssembler(self.max_frame_bytes)
            try:
                for message in requests:
                    assembler.add(message)
                request = assembler.message()
            except ChunkError as e:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except _Reject as err:
            self._reject(context, err)
            return
        reply = serve(request, context, self.max_frame_bytes)
        if reply:  # empty: rejected, the status is set
            chunk = max(assembler.largest_chunk, min(1 << 16, auto_chunk_bytes(self.max_message_bytes)))
            yield from chunk_messages(unwrap_frame(reply), chunk)

    def _rpc_health(self, request: bytes, context: grpc.ServicerContext) -> pb.HealthReply:
        try:
            self._check_token(context)
            _parse(pb.HealthRequest, request)
        except _Reject as err:
            self._reject(context, err)
            return pb.HealthReply()
        b = self.backend.summary()
        with self._lock:
            requests, rejected = sum(self._stats.requests.values()), sum(self._stats.rejected.values())
        return pb.HealthReply(
            ok=True,
            placement_version=b.placement_version,
            num_shards=b.num_shards,
            saved_entries=b.saved_entries,
            saved_bytes=b.saved_bytes,
            requests=requests,
            rejected=rejected,
            lane_port=self.lane_port,
        )

    def _rpc_end_step(self, request: bytes, context: grpc.ServicerContext) -> pb.EndStepReply:
        try:
            self._check_token(context)
            request = _parse(pb.EndStepRequest, request)
        except _Reject as err:
            self._reject(context, err)
            return pb.EndStepReply()
        free = self.backend.abort_step if request.abort else self.backend.end_step
        entries, nbytes = free(request.step)
        return pb.EndStepReply(freed_entries=entries, freed_bytes=nbytes)


def _parse(message_cls: Any, data: bytes) -> Any:
    """A protobuf request from its bytes; malformed bytes are INVALID_ARGUMENT naming the message type."""
    from google.protobuf.message import DecodeError

    try:
        return message_cls.FromString(data)
    except DecodeError as e:
        raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                      f"request is not a serialized {message_cls.__name__} ({len(data)} bytes): {e}") from None


class _TokenGate(grpc.GenericRpcHandler):
    """Checks the token from the call's metadata before any message is read. grpc-python asks generic handlers
    for the method handler with only the method name and metadata (grpc/_server.py `_find_method_handler`); the
    request message is received afterwards, by the handler type's reader. A call that fails the check gets a
    stream-unary handler that never iterates its request stream, so the message is never received into this
    process (only what the transport's HTTP/2 flow-control window already buffered)."""

    def __init__(self, server: ExpertServer, handlers: Sequence[grpc.GenericRpcHandler]):
        self._server = server
        self._handlers = tuple(handlers)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = None
        for h in self._handlers:
            handler = h.service(handler_call_details)
            if handler is not None:
                break
        if handler is None:
            return None  # UNIMPLEMENTED
        problem = self._server._token_problem(handler_call_details.invocation_metadata)
        if problem is None:
            return handler
        server = self._server

        def refuse(_unread_requests: Any, context: grpc.ServicerContext) -> bytes:
            server._count_reject(grpc.StatusCode.UNAUTHENTICATED)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        return grpc.stream_unary_rpc_method_handler(refuse, request_deserializer=None, response_serializer=None)
