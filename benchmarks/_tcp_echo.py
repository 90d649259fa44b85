"""A raw TCP loopback echo (no gRPC, no HTTP/2, no Python per byte): the physical limit transport.py compares raw
gRPC against. One server process, a thread per connection; each message is an 8-byte length and that many bytes,
echoed back whole (read fully, then sent). `TcpEcho.fan_out(payloads)` sends one payload per connection and reads
every echo back, the same traffic pattern as the raw gRPC fan-out (4 concurrent messages to 4 peers).
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import struct
import threading

__all__ = ["TcpEcho"]

_LEN = struct.Struct("<Q")


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def _serve_conn(conn: socket.socket) -> None:
    buf = bytearray(1 << 20)
    head = bytearray(8)
    with conn:
        try:
            while True:
                _recv_exact(conn, memoryview(head))
                (n,) = _LEN.unpack(head)
                if n > len(buf):
                    buf = bytearray(n)
                _recv_exact(conn, memoryview(buf)[:n])
                conn.sendall(memoryview(buf)[:n])
        except (ConnectionError, OSError):
            return


def _serve(port_q: mp.Queue) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    port_q.put(srv.getsockname()[1])
    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_serve_conn, args=(conn,), daemon=True).start()


class TcpEcho:
    """The echo server process and `connections` client sockets to it. Use as a context manager."""

    def __init__(self, connections: int = 4, timeout_s: float = 60.0):
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        self._proc = ctx.Process(target=_serve, args=(q,), daemon=True, name="tcp-echo")
        self._proc.start()
        port = q.get(timeout=timeout_s)
        self._socks = []
        for _ in range(connections):
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks.append(s)
        self._bufs: list[bytearray] = [bytearray(0) for _ in self._socks]

    def fan_out(self, payloads: list[bytes]) -> None:
        """Send payloads[i] on connection i (all sent before any echo is read), then read every echo back."""
        for s, p in zip(self._socks, payloads):
            s.sendall(_LEN.pack(len(p)))
            s.sendall(p)
        for i, (s, p) in enumerate(zip(self._socks, payloads)):
            if len(self._bufs[i]) < len(p):
                self._bufs[i] = bytearray(len(p))
            _recv_exact(s, memoryview(self._bufs[i])[: len(p)])

    def close(self) -> None:
        for s in self._socks:
            s.close()
        self._proc.kill()
        self._proc.join(5)

    def __enter__(self) -> TcpEcho:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
