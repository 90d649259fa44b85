"""The TCP lane: Dispatch and Backward frames over plain TCP sockets, beside the gRPC service.

Why: grpc-python copies a message several times in user space on each side (slices into a bytes per slice, then a
join; the same on send), so raw gRPC echo reaches ~0.3 of raw TCP on loopback (benchmarks/transport.py) and every
data-plane call pays ~1 ms of gRPC's own per-call cost. The lane sends the same `Frame` messages (envelope +
codec frame, exactly what the gRPC methods carry) with one `sendmsg` from the caller's buffers and receives them
with `recv_into` into a buffer placed so the codec frame starts 64-byte aligned: the kernel's copy is the only
one, and the server computes on the received bytes in place (no aligned copy). Control calls (Health, EndStep)
and the fallback stay on gRPC.

Protocol (all integers little-endian):
- Hello, client -> server once per connection: b"MOEH", uint32 version, uint32 token length, uint32 0, token.
  The server answers one reply prefix (status 0, or UNAUTHENTICATED and a message, then it closes).
- Request: b"MOEQ", uint8 method (1 Dispatch, 2 Backward), 3 zero bytes, uint64 length L, then the L-byte
  `Frame` message.
- Reply: b"MOER", uint8 status (a gRPC status code; 0 = OK), uint8 closing (1: the server closes the connection
  after this reply), 2 zero bytes, uint64 length L, then L bytes: the reply `Frame` message when OK, else a UTF-8
  message naming the problem.
One call at a time per connection; a client holds a pool of connections (one per call in flight; an idle one the
server has closed meanwhile is dropped, not used). A request the server cannot read (bad magic, unknown method,
over the frame limit) is answered "closing" and the connection closed (the stream cannot be resynchronised); a
frame the handler rejects is answered and the connection kept.

Failures map onto the gRPC status codes the rest of the runtime already handles (dispatch/failover.py): refused,
reset or closed connections are UNAVAILABLE, a reply not back by the call's deadline is DEADLINE_EXCEEDED (the
connection is then closed: its late reply must not answer the next call).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import torch

__all__ = ["LANE_VERSION", "LaneCall", "LaneClient", "LaneError", "LaneServer", "ServeFn", "init_compute_thread"]

LANE_VERSION = 1
_HELLO = struct.Struct("<4sIII")
_PREFIX = struct.Struct("<4sBB2xQ")  # magic, method (request) / status (reply), closing (reply), length
_HELLO_MAGIC, _REQUEST_MAGIC, _REPLY_MAGIC = b"MOEH", b"MOEQ", b"MOER"
METHODS = {"Dispatch": 1, "Backward": 2}
_METHOD_NAMES = {v: k for k, v in METHODS.items()}
_MAX_TOKEN_BYTES = 4096
_MAX_ERROR_BYTES = 1 << 16
_FRAME_OFFSET = 16  # the codec frame starts 16 bytes into a `Frame` message (dispatch/envelope.py)
_CODES = {c.value[0]: c for c in grpc.StatusCode}

# handler(method, request message, context) -> the reply message (bytes, or a list of bytes-likes that make it up);
# a rejection sets context's code and details
ServeFn = Callable[[str, memoryview, "LaneContext"], "bytes | list[Any]"]


class LaneError(Exception):
    """A lane call failed: `code` is the gRPC status code it maps to, `details` what happened."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class LaneContext:
    """What a handler reports a rejection through (the subset of grpc.ServicerContext the server's handlers use)."""

    __slots__ = ("code", "details")

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def init_compute_thread() -> None:
    """Give this (new) thread the process's intra-op thread count before it runs any torch op. OpenMP's thread count
    is per thread: torch sets it lazily at a thread's first parallel_for, but a matmul does not go through that, so
    a fresh thread whose first op is an MKL sgemm runs it on a team of one OpenMP thread per core, spinning (on a
    shared 2-core machine, tiny experts ran ~60x slower: docs/measurements.md)."""
    torch.set_num_threads(torch.get_num_threads())


def aligned_buffer(nbytes: int) -> memoryview:
    """A writable, uninitialised buffer of nbytes whose byte 16 (a `Frame` message's codec frame) is 64-byte
    aligned, so the codec's tensors (64-aligned within the frame) are too."""
    base = torch.empty(nbytes + 64, dtype=torch.uint8)
    skip = (-(base.data_ptr() + _FRAME_OFFSET)) % 64
    return memoryview(base.numpy()).cast("B")[skip : skip + nbytes]


_TIMEVAL = struct.Struct("@ll")  # struct timeval (Linux)


def _kernel_deadline(sock: socket.socket, deadline: float, option: int) -> None:
    """Bound the socket's next blocking send or recv (`option` SO_SNDTIMEO / SO_RCVTIMEO) by `deadline` in the
    kernel: the socket stays blocking, so a whole message is one recv (MSG_WAITALL) or one sendmsg instead of a poll
    and a syscall per chunk that arrives (Python's own timeouts poll)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("deadline passed")
    sec = int(left)
    sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(sec, max(1, int((left - sec) * 1e6))))  # 0 = none


def _recv_exact(sock: socket.socket, view: memoryview, deadline: float | None) -> None:
    """Fill `view` from `sock` (blocking, or with Python's timeout when it has one); raises ConnectionError on EOF,
    socket.timeout past `deadline` (monotonic)."""
    got, n = 0, len(view)
    while got < n:
        if deadline is not None:
            _kernel_deadline(sock, deadline, socket.SO_RCVTIMEO)
        try:
            k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        except BlockingIOError:  # EAGAIN: the kernel's receive timeout passed
            raise socket.timeout("deadline passed") from None
        if k == 0:
            raise ConnectionError("connection closed by the peer")
        got += k


def _nbytes(parts: list[Any]) -> int:
    """Bytes in `parts` (bytes-likes; a numpy array's nbytes, not its len)."""
    return sum(memoryview(p).nbytes for p in parts)


def _send_all(sock: socket.socket, parts: list[Any], deadline: float | None = None) -> None:
    """Send every byte of `parts` (bytes-like) with as few `sendmsg` calls as the kernel allows (no joining copy);
    with `deadline`, each sendmsg is bounded by the time left (a partial send restarts the kernel's timer)."""
    views = [v for v in (memoryview(p).cast("B") for p in parts) if len(v)]
    while views:
        if deadline is not None:
            _kernel_deadline(sock, deadline, socket.SO_SNDTIMEO)
        try:
            sent = sock.sendmsg(views)
        except BlockingIOError:  # EAGAIN: the kernel's send timeout passed
            raise socket.timeout("deadline passed") from None
        while sent and views:
            n = len(views[0])
            if sent >= n:
                sent -= n
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def _still_open(sock: socket.socket) -> bool:
    """Whether an idle connection is still open: between calls nothing may arrive on it, so a readable socket is a
    closed (or broken) one. One non-blocking peek."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # b"": closed; bytes between calls: out of step
    except BlockingIOError:
        return True  # nothing to read: open and idle
    except OSError:
        pass
    return False


def _reply_prefix(code: int, nbytes: int, closing: bool = False) -> bytes:
    return _PREFIX.pack(_REPLY_MAGIC, code, int(closing), nbytes)


class LaneServer:
    """Listens on `host` (port 0: any free one); one thread per connection runs `serve` for its requests in turn.

    `check_token(token) -> problem | None` authenticates each connection's hello; `max_frame_bytes` bounds a request
    before its buffer is allocated; `max_connections` bounds the threads (one more is answered RESOURCE_EXHAUSTED);
    `on_reject(code)` counts rejections the lane itself makes."""

    def __init__(self, serve: ServeFn, check_token: Callable[[bytes], str | None], host: str = "127.0.0.1",
                 port: int = 0, *, max_frame_bytes: int, on_reject: Callable[[grpc.StatusCode], None] | None = None,
                 max_connections: int = 512) -> None:  # fmt: skip
        self._serve, self._check_token, self._on_reject = serve, check_token, on_reject or (lambda code: None)
        self.max_frame_bytes = int(max_frame_bytes)
        self.max_connections = int(max_connections)
        bare = host.strip("[]")  # an IPv6 host as gRPC spells it, "[::1]"
        self._listener = socket.create_server((bare, port), family=socket.AF_INET6 if ":" in bare else socket.AF_INET)
        self.host, self.port = host, self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept_loop, name="expert-lane-accept", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        """Close the listener and every connection (their threads end on the closed socket)."""
        with self._lock:
            self._stopped = True
            conns, self._conns = list(self._conns), set()
        for s in [self._listener, *conns]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stopped:
                    conn.close()
                    return
                full = len(self._conns) >= self.max_connections
                if not full:
                    self._conns.add(conn)
            if full:  # answered on its own thread: a slow peer must not stall the accept loop
                threading.Thread(target=self._refuse_full, args=(conn,), name="expert-lane-full", daemon=True).start()
                continue
            threading.Thread(target=self._connection, args=(conn,), name="expert-lane", daemon=True).start()

    def _refuse_full(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5.0)
            self._refuse(conn, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"this lane already serves {self.max_connections} connections (max_connections)")
        except OSError:
            pass
        finally:
            conn.close()

    def _connection(self, conn: socket.socket) -> None:
        init_compute_thread()
        try:
            if self._hello(conn):
                while self._one_request(conn):
                    pass
        except (OSError, ConnectionError):
            pass  # the peer went away (or stop() closed the socket)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _refuse(self, conn: socket.socket, code: grpc.StatusCode, details: str) -> bool:
        """Answer a request the lane cannot read, then close (returns False: the connection ends)."""
        self._on_reject(code)
        body = details.encode()[:_MAX_ERROR_BYTES]
        _send_all(conn, [_reply_prefix(code.value[0], len(body), closing=True), body])
        # end our side, then read what the peer still sends for a moment: closing with unread bytes would reset the
        # connection, and a reset can discard the answer before the peer has read it
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(0.5)
        until = time.monotonic() + 1.0
        try:
            while time.monotonic() < until and conn.recv(1 << 16):
                pass
        except OSError:
            pass
        return False

    def _hello(self, conn: socket.socket) -> bool:
        head = bytearray(_HELLO.size)
        conn.settimeout(30.0)  # a connection that never says hello does not hold a thread for ever
        _recv_exact(conn, memoryview(head), None)
        magic, version, token_len, _ = _HELLO.unpack(head)
        if magic != _HELLO_MAGIC:
            return self._refuse(conn, grpc.StatusCode.INVALID_ARGUMENT, f"hello magic {bytes(magic)!r}: expected "
                                f"{_HELLO_MAGIC!r} (is this an expert lane client?)")  # fmt: skip
        if version != LANE_VERSION:
            return self._refuse(conn, grpc.StatusCode.FAILED_PRECONDITION,
                                f"lane version {version}: this server speaks version {LANE_VERSION}")
        if token_len > _MAX_TOKEN_BYTES:
            return self._refuse(conn, grpc.StatusCode.UNAUTHENTICATED,
                                f"token length {token_len}: expected <= {_MAX_TOKEN_BYTES}")
        token = bytearray(token_len)
        _recv_exact(conn, memoryview(token), None)
        problem = self._check_token(bytes(token))
        if problem is not None:
            return self._refuse(conn, grpc.StatusCode.UNAUTHENTICATED, problem)
        _send_all(conn, [_reply_prefix(0, 0)])
        conn.settimeout(None)  # between calls a connection may idle for as long as the client keeps it
        return True

    def _one_request(self, conn: socket.socket) -> bool:
        head = bytearray(_PREFIX.size)
        _recv_exact(conn, memoryview(head), None)
        magic, method_id, _, nbytes = _PREFIX.unpack(head)
        if magic != _REQUEST_MAGIC:
            return self._refuse(conn, grpc.StatusCode.INVALID_ARGUMENT,
                                f"request magic {bytes(magic)!r}: expected {_REQUEST_MAGIC!r}")
        method = _METHOD_NAMES.get(method_id)
        if method is None:
            return self._refuse(conn, grpc.StatusCode.UNIMPLEMENTED,
                                f"method id {method_id}: expected one of {sorted(_METHOD_NAMES)} ({METHODS})")
        if nbytes > self.max_frame_bytes:
            return self._refuse(conn, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{method} request of {nbytes} bytes: over this server's max_frame_bytes "
                                f"{self.max_frame_bytes}")  # fmt: skip
        try:
            request = aligned_buffer(nbytes)
        except RuntimeError as e:  # the declared size cannot be allocated
            return self._refuse(conn, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{method} request of {nbytes} bytes cannot be allocated: {e}")
        _recv_exact(conn, request, None)
        ctx = LaneContext()
        try:
            reply = self._serve(method, request, ctx)
        except Exception as e:  # noqa: BLE001 - a handler bug answers this call (gRPC's UNKNOWN), the server goes on
            ctx.code, ctx.details, reply = grpc.StatusCode.UNKNOWN, f"{type(e).__name__}: {e}", b""
        if ctx.code is not None and ctx.code != grpc.StatusCode.OK:
            body = ctx.details.encode()[:_MAX_ERROR_BYTES]
            _send_all(conn, [_reply_prefix(ctx.code.value[0], len(body)), body])
        else:
            parts = [reply] if isinstance(reply, (bytes, bytearray, memoryview)) else reply
            _send_all(conn, [_reply_prefix(0, _nbytes(parts)), *parts])
        return True


class LaneCall:
    """A request sent on one of the client's connections; `result()` waits for the reply message (a view of an
    aligned buffer) or raises LaneError. The connection goes back to the pool once the reply is read."""

    __slots__ = ("_client", "_deadline", "_outcome", "_sock")

    def __init__(self, client: LaneClient, sock: socket.socket | None, deadline: float,
                 outcome: memoryview | LaneError | None = None):  # fmt: skip
        self._client, self._sock, self._deadline, self._outcome = client, sock, deadline, outcome

    def done(self) -> bool:
        return self._outcome is not None

    def cancel(self) -> bool:
        """Drop the call: its connection is closed (a late reply must not answer another call)."""
        if self._outcome is not None:
            return False
        self._client._discard(self._sock)
        self._sock, self._outcome = None, LaneError(grpc.StatusCode.CANCELLED, "cancelled")
        return True

    def result(self) -> memoryview:
        if self._outcome is None:
            self._outcome = self._client._receive(self._sock, self._deadline)
            self._sock = None
        if isinstance(self._outcome, LaneError):
            raise self._outcome
        return self._outcome


class LaneClient:
    """Connections to one server's lane at `address` ("host:port"), authenticated by `token`, pooled."""

    def __init__(self, address: str, token: str, deadline_s: float, max_frame_bytes: int):
        host, _, port = address.rpartition(":")
        self.address, self._host, self._port = address, host.strip("[]"), int(port)
        self._token = token.encode()
        self.deadline_s = float(deadline_s)
        self.max_frame_bytes = int(max_frame_bytes)
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def call(self, method: str, message: bytes | memoryview | None, parts: list[Any] | None = None) -> LaneCall:
        """Send `message` (a `Frame` message; or `parts`, bytes-likes that make it up, sent without joining) to
        `method`; returns at once with the call in flight (its reply waits in the socket until `result()`)."""
        deadline = time.monotonic() + self.deadline_s
        body = [message] if parts is None else parts
        try:
            sock = self._connection(deadline)
        except LaneError as e:
            return LaneCall(self, None, deadline, e)
        try:
            _send_all(sock, [_PREFIX.pack(_REQUEST_MAGIC, METHODS[method], 0, _nbytes(body)), *body], deadline)
        except (OSError, ConnectionError) as e:
            self._discard(sock)
            return LaneCall(self, None, deadline, self._os_error(e, "sending the request"))
        return LaneCall(self, sock, deadline)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for s in idle:
            s.close()

    # ------------------------------------------------------------------ internals

    def _os_error(self, e: BaseException, doing: str) -> LaneError:
        if isinstance(e, socket.timeout):
            return LaneError(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"no reply within the deadline of {self.deadline_s} s ({doing}, lane {self.address})")
        return LaneError(grpc.StatusCode.UNAVAILABLE, f"lane {self.address}: {doing}: {type(e).__name__}: {e}")

    def _connection(self, deadline: float) -> socket.socket:
        with self._lock:
            if self._closed:
                raise LaneError(grpc.StatusCode.CANCELLED, f"lane client of {self.address} is closed")
            while self._idle:
                sock = self._idle.pop()
                if _still_open(sock):
                    return sock
                sock.close()  # the server closed it while it was idle: a new one below
        try:
            sock = socket.create_connection((self._host, self._port), timeout=max(1e-3, deadline - time.monotonic()))
        except (OSError, ConnectionError) as e:
            raise self._os_error(e, "connecting") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)  # blocking: each call bounds its own sends and recvs in the kernel (_kernel_deadline)
            _send_all(sock, [_HELLO.pack(_HELLO_MAGIC, LANE_VERSION, len(self._token), 0), self._token], deadline)
            code, body, _ = self._read_reply(sock, deadline, limit=_MAX_ERROR_BYTES)
        except LaneError:
            sock.close()
            raise
        except (OSError, ConnectionError) as e:
            sock.close()
            raise self._os_error(e, "saying hello") from None
        if code != 0:
            sock.close()
            raise LaneError(_CODES.get(code, grpc.StatusCode.UNKNOWN), bytes(body).decode(errors="replace"))
        return sock

    def _read_reply(self, sock: socket.socket, deadline: float, limit: int) -> tuple[int, memoryview, bool]:
        head = bytearray(_PREFIX.size)
        _recv_exact(sock, memoryview(head), deadline)
        magic, code, closing, nbytes = _PREFIX.unpack(head)
        if magic != _REPLY_MAGIC:
            raise LaneError(grpc.StatusCode.INTERNAL, f"lane {self.address}: reply magic {bytes(magic)!r}: "
                            f"expected {_REPLY_MAGIC!r}")  # fmt: skip
        if nbytes > (limit if code == 0 else _MAX_ERROR_BYTES):
            raise LaneError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"lane {self.address}: reply of {nbytes} bytes: over the limit {limit}")
        body = aligned_buffer(nbytes)
        _recv_exact(sock, body, deadline)
        return code, body, bool(closing)

    def _receive(self, sock: socket.socket | None, deadline: float) -> memoryview | LaneError:
        if sock is None:
            return LaneError(grpc.StatusCode.CANCELLED, "cancelled")
        try:
            code, body, closing = self._read_reply(sock, deadline, limit=self.max_frame_bytes)
        except LaneError as e:
            self._discard(sock)
            return e
        except (OSError, ConnectionError) as e:
            self._discard(sock)
            return self._os_error(e, "waiting for the reply")
        if closing:  # the server answered a request it could not read and closes this connection
            self._discard(sock)
        else:
            self._release(sock)
        if code != 0:
            return LaneError(_CODES.get(code, grpc.StatusCode.UNKNOWN), bytes(body).decode(errors="replace"))
        return body

    def _release(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(sock)
                return
        sock.close()

    def _discard(self, sock: socket.socket | None) -> None:
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
