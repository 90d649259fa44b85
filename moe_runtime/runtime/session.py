"""Keep a cluster up between CLI calls: `moe-runtime up` starts a daemon that owns the Cluster (it is the Ray
driver); `status`, `train`, `forward`, `down` talk to it; without a daemon they start and stop a cluster themselves.

Why a daemon and not detached Ray actors: the driver owns the step loop, the placement and the recovery logic,
so something must outlive the CLI process anyway; a daemon keeps that one code path (the same `Cluster` object
that `train` uses without `up`) and works the same on a local Ray and on `ray_address` clusters.

Control channel: multiprocessing.connection on 127.0.0.1 with an HMAC authkey (stdlib), address and key in a
state file readable only by the user. What is survived: a CLI process dying (the daemon goes on). What is not:
the daemon dying (it is the driver: actors go with it; restart with `up` and `restore` a checkpoint).
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any, TypeVar

from moe_runtime.config import RuntimeConfig, load_config

T = TypeVar("T")
STATE_DIR = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "moe-runtime"
ALLOWED = frozenset({"train", "forward", "status", "checkpoint", "restore"})


class SessionError(RuntimeError):
    pass


# Plain pickle over send_bytes: Connection.send uses multiprocessing's ForkingPickler, for which torch registers
# reducers that pass tensors as shared-memory file descriptors through a side channel (resource_sharer) with
# another authkey: that fails between unrelated processes. Plain pickle copies tensor bytes into the message.
def _send(conn: Connection, obj: Any) -> None:
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def state_file(name: str = "default") -> Path:
    return STATE_DIR / f"{name}.json"


# ----------------------------------------------------------------------------------------------- daemon side


def serve(config_path: str, name: str = "default") -> None:
    """Start the cluster, then answer requests until `shutdown`. Runs in the daemon process."""
    from moe_runtime.runtime.cluster import Cluster

    cfg = load_config(config_path)
    key = secrets.token_bytes(32)
    listener = Listener(("127.0.0.1", 0), authkey=key)
    path = state_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    cluster = None
    try:
        cluster = Cluster.start(cfg)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "port": listener.address[1], "key": key.hex(),
                       "config": str(Path(config_path).resolve())}, f)
        os.replace(tmp, path)
        print(f"moe-runtime daemon ready on 127.0.0.1:{listener.address[1]}", flush=True)
        while True:
            with listener.accept() as conn:
                if _handle(conn, cluster):
                    break
    finally:
        path.unlink(missing_ok=True)
        listener.close()
        if cluster is not None:
            cluster.shutdown()


def _handle(conn: Connection, cluster: Any) -> bool:
    """One request: (method, args, kwargs). Returns True on shutdown. Errors go back to the caller, never kill us."""
    try:
        method, args, kwargs = _recv(conn)
    except (EOFError, OSError, ValueError, pickle.UnpicklingError):
        return False
    if method == "shutdown":
        _send(conn, ("ok", None))
        return True
    if method not in ALLOWED:
        _send(conn, ("error", f"method = {method!r}: expected one of {sorted(ALLOWED)} or 'shutdown'"))
        return False
    try:
        if method == "train":
            kwargs["progress"] = lambda step, loss: _send(conn, ("progress", (step, loss)))
        _send(conn, ("ok", getattr(cluster, method)(*args, **kwargs)))
    except Exception as e:  # noqa: BLE001 - report every failure to the CLI and keep serving
        try:
            _send(conn, ("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
    return False


# ----------------------------------------------------------------------------------------------- client side


class RemoteCluster:
    """The subset of Cluster's API the CLI uses, forwarded to a running daemon."""

    def __init__(self, info: dict):
        self.info = info

    def _call(self, method: str, *args: Any, progress: Callable | None = None, **kwargs: Any) -> Any:
        try:
            conn = Client(("127.0.0.1", self.info["port"]), authkey=bytes.fromhex(self.info["key"]))
        except (ConnectionRefusedError, OSError) as e:
            raise SessionError(f"cannot reach the cluster daemon (pid {self.info['pid']}): {e}; "
                               f"run `moe-runtime down` to clean up, then `up` again") from None
        with conn:
            _send(conn, (method, args, kwargs))
            while True:
                kind, payload = _recv(conn)
                if kind == "progress":
                    if progress:
                        progress(*payload)
                    continue
                if kind == "error":
                    raise SessionError(f"cluster daemon: {payload}")
                return payload

    def train(self, steps: int, progress: Callable | None = None, record_trace: str | None = None) -> Any:
        return self._call("train", steps, progress=progress, record_trace=record_trace)

    def forward(self, tokens: Any) -> Any:
        return self._call("forward", tokens)

    def status(self) -> dict:
        return self._call("status")

    def checkpoint(self, path: str) -> Any:
        return self._call("checkpoint", path)

    def restore(self, path: str) -> Any:
        return self._call("restore", path)

    def shutdown(self) -> None:
        self._call("shutdown")


def running(name: str = "default") -> RemoteCluster | None:
    """The daemon's handle, or None when none is up (a stale state file of a dead daemon is removed)."""
    path = state_file(name)
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        return None
    return RemoteCluster(info)


def start_daemon(config_path: str | Path, name: str = "default", timeout_s: float = 300.0,
                 log: Path | None = None) -> RemoteCluster:
    """Spawn the daemon (own session, so it outlives this process) and wait until it is ready."""
    if running(name):
        raise SessionError(f"a cluster is already up (state file {state_file(name)}); run `moe-runtime down` first")
    load_config(config_path)  # fail here, before spawning, on a bad config
    log = log or STATE_DIR / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moe_runtime.runtime.session", str(config_path), name],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        handle = running(name)
        if handle:
            return handle
        if proc.poll() is not None:
            raise SessionError(f"cluster daemon exited with code {proc.returncode}; its log:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    proc.kill()
    raise SessionError(f"cluster daemon not ready after {timeout_s:.0f} s; see {log}")


def stop_daemon(name: str = "default", timeout_s: float = 60.0) -> bool:
    handle = running(name)
    if handle is None:
        return False
    pid = handle.info["pid"]
    try:
        handle.shutdown()
    except SessionError:
        os.kill(pid, 15)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.3)
    else:
        os.kill(pid, 9)
    state_file(name).unlink(missing_ok=True)
    return True


def run_on_cluster(cfg: RuntimeConfig, fn: Callable[[Any], T], name: str = "default") -> T:
    """Run fn(cluster) on the running daemon if one is up, else on a cluster started and stopped for this call."""
    handle = running(name)
    if handle is not None:
        return fn(handle)
    from moe_runtime.runtime.cluster import Cluster

    with Cluster.start(cfg) as cluster:
        return fn(cluster)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "default")
