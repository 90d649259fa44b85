"""Keep a cluster up between CLI calls: `moe-runtime up` starts a daemon that owns the Cluster (it is the Ray
driver); `status`, `train`, `forward`, `down` talk to it; without a daemon they start and stop a cluster themselves.

Why a daemon and not detached Ray actors: the driver owns the step loop, the placement and the recovery logic,
so something must outlive the CLI process anyway; a daemon keeps that one code path (the same `Cluster` object
that `train` uses without `up`) and works the same on a local Ray and on `ray_address` clusters.

Control channel: multiprocessing.connection on 127.0.0.1 with an HMAC authkey (stdlib), address and key in a
state file readable only by the user. What is survived: a CLI process dying (the daemon goes on). What is not:
the daemon dying (it is the driver: actors go with it; restart with `up` and `restore` a checkpoint). The Ray
processes a dead daemon started itself (local mode) are stopped by the next command that finds its state file.

Names: every cluster has a name (`moe-runtime --name N ...`; default: one per working directory, see
`default_name`), with its own state file and log (STATE_DIR/<name>.json and .log).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any, TypeVar

from moe_runtime.config import RuntimeConfig

T = TypeVar("T")
STATE_DIR = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "moe-runtime"
ALLOWED = frozenset({"train", "train_more", "forward", "generate", "status", "checkpoint", "restore", "save_hf",
                     "scale", "degraded_pairs"})


class SessionError(RuntimeError):
    pass


# Plain pickle over send_bytes: Connection.send uses multiprocessing's ForkingPickler, for which torch registers
# reducers that pass tensors as shared-memory file descriptors through a side channel (resource_sharer) with
# another authkey: that fails between unrelated processes. Plain pickle copies tensor bytes into the message.
def _send(conn: Connection, obj: Any) -> None:
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


_name: str | None = None  # set by `moe-runtime --name`; None = default_name()


def default_name(cwd: Path | None = None) -> str:
    """One cluster per working directory: '<dir name>-<8 hex of its absolute path>'."""
    cwd = (cwd or Path.cwd()).resolve()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cwd.name) or "root"
    return f"{safe}-{hashlib.sha1(str(cwd).encode()).hexdigest()[:8]}"


def set_name(name: str | None) -> None:
    if name is not None and (not name or any(not (c.isalnum() or c in "-_.") for c in name)):
        raise SessionError(f"--name = {name!r}: expected letters, digits, '-', '_' or '.'")
    global _name
    _name = name


def current_name(name: str | None = None) -> str:
    return name or _name or default_name()


def state_file(name: str | None = None) -> Path:
    return STATE_DIR / f"{current_name(name)}.json"


def log_file(name: str | None = None) -> Path:
    return STATE_DIR / f"{current_name(name)}.log"


def _write_state(path: Path, info: dict) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- daemon side


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks (and Ray's atexit): stop what was started


def _record_ray_pids_while_starting(path: Path, info: dict) -> None:
    """While the cluster starts: once this process has started a local Ray, note its processes in the state file,
    so whoever stops a daemon killed mid-start can stop them too."""
    while info.get("state") == "starting":
        ray = sys.modules.get("ray")  # never import it here: local mode must set Ray's environment first
        worker = sys.modules.get("ray._private.worker")
        node = getattr(worker, "_global_node", None)
        initialized = getattr(ray, "is_initialized", None)  # None while `import ray` is still running
        if initialized is not None and initialized() and node is not None and getattr(node, "head", False):
            pids = [[p.process.pid, _proc_start(p.process.pid), str(kind)]
                    for kind, infos in node.all_processes.items() for p in infos]
            if pids and info.get("state") == "starting":
                _write_state(path, {**info, "ray_pids": pids})
            return
        time.sleep(0.5)


def serve(config_path: str, name: str = "default", checkpoint: str | None = None) -> None:
    """Start the cluster, then answer requests until `shutdown`. Runs in the daemon process."""
    from moe_runtime.checkpoint.run_config import load_run_config
    from moe_runtime.runtime.cluster import Cluster

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    cfg = load_run_config(config_path, checkpoint)
    key = secrets.token_bytes(32)
    listener = Listener(("127.0.0.1", 0), authkey=key)
    path = state_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"name": name, "pid": os.getpid(), "state": "starting", "cwd": os.getcwd(),
                            "config": str(Path(config_path).resolve()), "log": str(log_file(name))}
    _write_state(path, info)
    threading.Thread(target=_record_ray_pids_while_starting, args=(path, info), daemon=True).start()
    cluster = None
    try:
        cluster = Cluster.start(cfg)
        info.update(state="ready", port=listener.address[1], key=key.hex(), run_config=cfg.model_dump(mode="json"),
                    ray_mode=cluster.env.mode, dashboard_url=cluster.env.dashboard_url,
                    ray_address=cfg.cluster.ray_address, ray_pids=_owned_ray_pids(cluster.env))
        _write_state(path, info)
        print(f"moe-runtime daemon {name!r} ready on 127.0.0.1:{listener.address[1]}", flush=True)
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
        if method == "train_more":  # N more steps from where the cluster is; progress counts from 0 of this call
            first = cluster.step
            method, args = "train", (first + args[0], *args[1:])
            kwargs["progress"] = lambda step, loss: _send(conn, ("progress", (step - first, loss)))
        elif method == "train":
            kwargs["progress"] = lambda step, loss: _send(conn, ("progress", (step, loss)))
        if method == "train" and kwargs.pop("want_steps", False):
            kwargs["step_log"] = lambda record: _send(conn, ("step", record))
        if method == "generate":  # stream every token event back as it comes
            kwargs["on_event"] = lambda event: _send(conn, ("progress", (event,)))
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

    def _call(self, method: str, *args: Any, progress: Callable | None = None, on_step: Callable | None = None,
              **kwargs: Any) -> Any:
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
                if kind == "step":
                    if on_step:
                        on_step(payload)
                    continue
                if kind == "error":
                    raise SessionError(f"cluster daemon: {payload}")
                return payload

    def train(self, steps: int, progress: Callable | None = None, record_trace: str | None = None,
              step_log: Callable | None = None) -> Any:
        return self._call("train", steps, progress=progress, record_trace=record_trace, on_step=step_log,
                          want_steps=step_log is not None)

    def train_more(self, steps: int, progress: Callable | None = None, record_trace: str | None = None,
                   step_log: Callable | None = None) -> Any:
        """`steps` more steps from the daemon's current step; progress(i, loss) with i from 0."""
        return self._call("train_more", steps, progress=progress, record_trace=record_trace, on_step=step_log,
                          want_steps=step_log is not None)

    def forward(self, tokens: Any) -> Any:
        return self._call("forward", tokens)

    @property
    def last_degraded(self) -> list[list[int]]:
        """Cluster.last_degraded of the daemon: what its last forward / generate was masked on."""
        return self._call("degraded_pairs")

    def generate(self, prompts: list, params: Any = None, on_event: Callable | None = None) -> list:
        return self._call("generate", prompts, params, progress=on_event)

    def status(self) -> dict:
        return self._call("status")

    def checkpoint(self, path: str) -> Any:
        return self._call("checkpoint", path)

    def restore(self, path: str) -> Any:
        return self._call("restore", path)

    def save_hf(self, directory: str, **kwargs: Any) -> Any:
        return self._call("save_hf", directory, **kwargs)

    def scale(self, expert_actors: int) -> Any:
        return self._call("scale", expert_actors)

    def shutdown(self) -> None:
        self._call("shutdown")


def _proc_start(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat): a pid plus this names one process, not a reuse."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owned_ray_pids(env: Any) -> list[list]:
    """[pid, start time, kind] of the Ray processes this daemon started (local / simulated multi-node Ray only:
    a joined cluster's processes are not ours). Worker processes are children of the raylet and die with it."""
    if not getattr(env, "owned", False) or env.mode not in ("local", "multinode"):
        return []
    import ray

    nodes = [ray._private.worker._global_node]
    sim = getattr(env, "_sim", None)
    if sim is not None:
        nodes = list(sim.list_all_nodes())
    out = []
    for node in nodes:
        for kind, infos in (getattr(node, "all_processes", None) or {}).items():
            for p in infos:
                pid = p.process.pid
                out.append([pid, _proc_start(pid), str(kind)])
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}/stat").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]


def _stop_ray_pids(ray_pids: list[list], grace_s: float = 5.0) -> list[str]:
    """SIGTERM then SIGKILL each recorded Ray process that is still the same process; returns 'kind pid' of each."""
    mine = [(pid, kind) for pid, start, kind in ray_pids if start is not None and _proc_start(pid) == start]
    for pid, _ in mine:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(pid) for pid, _ in mine):
        time.sleep(0.1)
    for pid, _ in mine:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return [f"{kind} (pid {pid})" for pid, kind in mine]


_reaped: dict[str, str] = {}  # name -> what was found when a dead daemon's state file was cleaned up


def reaped(name: str | None = None) -> str | None:
    """What the last `running()` found of a dead daemon of this name (None when it found none)."""
    return _reaped.get(current_name(name))


def _reap(info: dict, path: Path) -> str:
    stopped = _stop_ray_pids(info.get("ray_pids") or [])
    path.unlink(missing_ok=True)
    what = (f"the daemon of cluster {info.get('name', path.stem)!r} (pid {info['pid']}) is gone (killed or crashed; "
            f"its log: {info.get('log', '?')})")
    if stopped:
        what += f"; stopped the {len(stopped)} Ray process(es) it left behind: {', '.join(stopped)}"
    elif info.get("ray_mode") == "address":
        what += f"; its actors on the Ray cluster at {info.get('ray_address')} went with it (Ray frees them)"
    else:
        what += "; no Ray process of it was left"
    return what


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def running(name: str | None = None) -> RemoteCluster | None:
    """The daemon's handle, or None when none is up and ready. The state file of a dead daemon is removed and the
    Ray processes it started are stopped (what was found: `reaped(name)`)."""
    name = current_name(name)
    path = state_file(name)
    info = _read_state(path) if path.exists() else None
    if info is None:
        return None
    if not _alive(info["pid"]):
        _reaped[name] = _reap(info, path)
        return None
    if info.get("state", "ready") != "ready":
        return None
    return RemoteCluster(info)


def starting(name: str | None = None) -> dict | None:
    """The state of a daemon that is still starting (None otherwise)."""
    info = _read_state(state_file(name)) if state_file(name).exists() else None
    return info if info and info.get("state") == "starting" and _alive(info["pid"]) else None


def start_daemon(config_path: str | Path, name: str | None = None, timeout_s: float = 300.0,
                 log: Path | None = None, checkpoint: str | Path | None = None) -> RemoteCluster:
    """Spawn the daemon (own session, so it outlives this process) and wait until it is ready. Ctrl-C (or any
    exception) while waiting stops the daemon and everything it started."""
    name = current_name(name)
    if running(name) or starting(name):
        raise SessionError(f"cluster {name!r} is already up (state file {state_file(name)}); run "
                           f"`moe-runtime --name {name} down` first, or pick another --name")
    from moe_runtime.checkpoint.run_config import load_run_config

    cfg = load_run_config(config_path, checkpoint)  # fail here, before spawning, on a bad config
    from moe_runtime.runtime.launch import check_config
    from moe_runtime.runtime.ray_env import ClusterStartError

    try:
        check_config(cfg)  # layout problems (e.g. more CPUs than the machine has) before spawning, no traceback
    except ClusterStartError as e:
        raise SessionError(str(e)) from None
    log = log or log_file(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        extra = [str(Path(checkpoint).resolve())] if checkpoint is not None else []
        proc = subprocess.Popen([sys.executable, "-m", "moe_runtime.runtime.session", str(config_path), name, *extra],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            handle = running(name)
            if handle:
                return handle
            if proc.poll() is not None:
                text, marker = log.read_text(), "moe-runtime daemon: cannot start the cluster: "
                if proc.returncode == 3 and marker in text:
                    raise SessionError(f"{text.split(marker, 1)[1].strip()}\n(daemon log: {log})")
                raise SessionError(f"cluster daemon exited with code {proc.returncode}; its log ({log}):\n"
                                   f"{_tail(text, 40)}")
            time.sleep(0.5)
        raise SessionError(f"cluster daemon not ready after {timeout_s:.0f} s; see {log}")
    except BaseException:
        _terminate(proc, name)
        raise


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _terminate(proc: subprocess.Popen, name: str, grace_s: float = 30.0) -> None:
    """Stop a daemon we spawned: SIGTERM (it stops its cluster), then SIGKILL and its Ray processes."""
    info = _read_state(state_file(name))  # read first: a daemon that exits cleanly removes its state file
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    info = _read_state(state_file(name)) or info
    if info is not None and info.get("pid") == proc.pid:
        _stop_ray_pids(info.get("ray_pids") or [])
        state_file(name).unlink(missing_ok=True)


def stop_daemon(name: str | None = None, timeout_s: float = 60.0) -> bool:
    name = current_name(name)
    handle = running(name)
    info = handle.info if handle is not None else starting(name)
    if info is None:
        return False
    pid = info["pid"]
    try:
        if handle is None:
            raise SessionError("still starting")
        handle.shutdown()
    except SessionError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.3)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        _stop_ray_pids(info.get("ray_pids") or [])
    state_file(name).unlink(missing_ok=True)
    return True


# Fields that may differ between a command and the running cluster: how many steps to run is the command's.
_PER_CALL = {("train", "steps"), ("sim",)}


def config_differences(theirs: dict | None, mine: RuntimeConfig) -> list[tuple[str, Any, Any]]:
    """(dotted field, the running cluster's value, this command's value) for every field that differs."""
    if theirs is None:
        return []
    out: list[tuple[str, Any, Any]] = []

    def walk(a: Any, b: Any, path: tuple[str, ...]) -> None:
        if path[:1] in _PER_CALL or path[:2] in _PER_CALL:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), (*path, k))
        elif a != b:
            out.append((".".join(path), a, b))

    walk(theirs, mine.model_dump(mode="json"), ())
    return out


def check_matches(handle: RemoteCluster, cfg: RuntimeConfig) -> None:
    """Refuse (SessionError naming every field and both values) when cfg contradicts the running cluster."""
    diffs = config_differences(handle.info.get("run_config"), cfg)
    if diffs:
        name = handle.info.get("name", "?")
        lines = "\n".join(f"  {f}: the cluster runs {a!r}, this command asks for {b!r}" for f, a, b in diffs[:12])
        more = f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else ""
        raise SessionError(
            f"the running cluster {name!r} (started from {handle.info.get('config')}) was set up differently:\n"
            f"{lines}{more}\nDrop those flags / use its config, or `moe-runtime --name {name} down` and `up` again "
            f"with the new config (or use --name for a second cluster).")


def run_on_cluster(cfg: RuntimeConfig, fn: Callable[[Any], T], name: str | None = None) -> T:
    """Run fn(cluster) on the running daemon if one is up (refusing a config that contradicts it), else on a
    cluster started and stopped for this call."""
    handle = running(name)
    if handle is not None:
        check_matches(handle, cfg)
        return fn(handle)
    from moe_runtime.runtime.cluster import Cluster

    with Cluster.start(cfg) as cluster:
        return fn(cluster)


def _main(argv: list[str]) -> int:
    from moe_runtime.runtime.ray_env import ClusterStartError

    try:
        serve(argv[1], argv[2] if len(argv) > 2 else "default", argv[3] if len(argv) > 3 else None)
    except ClusterStartError as e:  # a config / cluster problem: the message says it all
        print(f"moe-runtime daemon: cannot start the cluster: {e}", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
