"""Start gRPC servers in separate OS processes (multiprocessing, forkserver) for tests and benchmarks.

`ServerProcess(kind="expert", ...)` runs `ExpertShards` served by an `ExpertServer` in a child process, bound to
127.0.0.1, and plays the owning actor: `call("grads")`, `call("load", shards, replace=True)`, ... run the shards'
control methods in the child over a pipe and return their (pickled) results; `call("stats")` merges the server's
and the shards' stats as ExpertActor.stats does. `kind="echo"` runs a bare gRPC bytes-echo service with the same
channel options; `server_class="module:Class"` / `shards_class="module:Class"` run subclasses (benchmarks).

Everything is bounded: the child starts within `start_timeout`, each control call returns within `timeout`, and
a child exits on its own when its parent process dies or its pipe closes (no orphans if a test run is killed).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from typing import Any

from typing_extensions import Self

# forkserver with the heavy imports preloaded: the fork server imports torch, grpc and the service once, and every
# server process is a cheap fork of it (spawn re-imported torch in each child: ~2-3 s of CPU per server, minutes
# on a loaded 2-core machine). The fork server itself never creates threads, channels or tensors before forking.
_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "grpc", "moe_runtime.dispatch.server", "moe_runtime.runtime.expert_shards"])

ECHO_SERVICE = "moe_runtime.bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"


def _serve(conn: Any, kind: str, kwargs: dict[str, Any], torch_threads: int) -> None:
    parent = os.getppid()
    if kind == "expert":
        import torch

        torch.set_num_threads(torch_threads)
    try:
        server, address = _make_server(kind, kwargs)
    except Exception as e:  # noqa: BLE001  (any start failure is reported to the parent, which raises it)
        conn.send(("error", f"{type(e).__name__}: {e}", os.getpid()))
        return
    conn.send(("ready", address, os.getpid()))
    try:
        while os.getppid() == parent:
            if not conn.poll(0.5):
                continue
            try:
                msg = conn.recv()
            except EOFError:
                break
            if msg is None:
                break
            name, args, kw = msg
            try:
                conn.send(("ok", getattr(server, name)(*args, **kw)))
            except Exception as e:  # noqa: BLE001  (reported to the parent, which raises it)
                conn.send(("err", f"{type(e).__name__}: {e}"))
    finally:
        if kind == "expert":
            server.stop(0)
        else:
            server.stop(0).wait(5)


class ExpertHost:
    """The owning actor's side in the child: control calls go to the shards, stats merge both (as ExpertActor)."""

    def __init__(self, shards: Any, server: Any):
        self.shards, self.server = shards, server

    def __getattr__(self, name: str) -> Any:
        return getattr(self.shards, name)

    def stats(self) -> dict[str, Any]:
        return {**self.server.stats(), **self.shards.stats()}

    def stop(self, grace: float | None = None) -> None:
        self.server.stop(grace)


def _class(spec: str | None, default: Any) -> Any:
    """`"module:Class"` imported, or `default` when None."""
    if spec is None:
        return default
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _make_server(kind: str, kwargs: dict[str, Any]) -> tuple[Any, str]:
    if kind == "expert":
        from moe_runtime.dispatch.server import ExpertServer
        from moe_runtime.runtime.expert_shards import ExpertShards

        shards = _class(kwargs.pop("shards_class", None), ExpertShards)(kwargs.pop("shards", {}))
        server = _class(kwargs.pop("server_class", None), ExpertServer)(shards, **kwargs)
        return ExpertHost(shards, server), server.start()
    if kind == "echo":
        from concurrent import futures

        import grpc

        limit = kwargs.get("max_message_bytes", 256 << 20)
        opts = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=kwargs.get("threads", 4)), options=opts)
        handler = grpc.method_handlers_generic_handler(
            ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)}
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        return server, f"127.0.0.1:{port}"
    raise ValueError(f"kind = {kind!r}: expected 'expert' or 'echo'")


class ServerProcess:
    """A server in its own process. Use as a context manager or call `stop()`."""

    def __init__(self, kind: str = "expert", *, torch_threads: int = 1, start_timeout: float = 60.0,
                 **server_kwargs: Any):  # fmt: skip
        ctx = _CTX
        self._conn, child = ctx.Pipe()
        self.kind = kind
        self.process = ctx.Process(
            target=_serve, args=(child, kind, server_kwargs, torch_threads), daemon=True, name=f"{kind}-server"
        )
        self.process.start()
        child.close()
        self._start_timeout = start_timeout
        self.address: str | None = None
        self.pid: int | None = None

    def wait_ready(self) -> str:
        if self.address is None:
            if not self._conn.poll(self._start_timeout):
                self.kill()
                raise TimeoutError(f"{self.kind} server process did not start within {self._start_timeout} s")
            try:
                tag, value, self.pid = self._conn.recv()
            except EOFError:
                self.process.join(5)
                raise RuntimeError(f"{self.kind} server process died during start "
                                   f"(exit code {self.process.exitcode})") from None
            if tag != "ready":
                self.process.join(5)
                raise RuntimeError(f"{self.kind} server failed to start: {value}")
            self.address = value
        return self.address

    def call(self, name: str, *args: Any, timeout: float = 60.0, **kwargs: Any) -> Any:
        """Run `<name>(*args, **kwargs)` on the child's ExpertHost (the owning actor's in-process control path)."""
        self.wait_ready()
        self._conn.send((name, args, kwargs))
        if not self._conn.poll(timeout):
            raise TimeoutError(f"{self.kind} server {self.address}: {name} did not return within {timeout} s")
        tag, value = self._conn.recv()
        if tag == "err":
            raise RuntimeError(f"{self.kind} server {self.address}: {name} raised {value}")
        return value

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss

    def kill(self) -> None:
        """SIGKILL: the process dies without closing its sockets (a crashed actor)."""
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)

    def request_stop(self) -> None:
        """Ask the child to shut down without waiting (see `stop_servers`)."""
        if self.process.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass

    def stop(self, timeout: float = 10.0) -> None:
        self.request_stop()
        self.process.join(timeout)
        if self.process.is_alive():
            self.kill()
        self._conn.close()

    def __enter__(self) -> Self:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_servers(n: int, kind: str = "expert", **kwargs: Any) -> list[ServerProcess]:
    """Start n servers concurrently (their imports overlap) and wait until every one serves."""
    procs = [ServerProcess(kind, **kwargs) for _ in range(n)]
    try:
        t0 = time.monotonic()
        for p in procs:
            p.wait_ready()
        assert time.monotonic() - t0 < 120
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return procs


def stop_servers(procs: list[ServerProcess], timeout: float = 10.0) -> None:
    """Stop servers concurrently: every child is asked first, then each is joined (killed past the timeout)."""
    for p in procs:
        p.request_stop()
    for p in procs:
        p.stop(timeout)
