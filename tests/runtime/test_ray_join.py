"""Joining a real Ray cluster: a head started with `ray start --head` on loopback (its own process group, stopped by
its PIDs in a finally), then `up`, `train --steps 3 --json`, `forward`, `down` through `cluster.ray_address`, with
no RAY_* variable set for the CLI; afterwards the head runs on, with the same node and all its resources free.
A wrong address fails within the connect timeout with a message that says what to check."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from moe_runtime.runtime.ray_join import JoinError, probe_tcp, split_host_port

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # nothing set by hand for Ray
    return subprocess.run([sys.executable, "-m", "moe_runtime.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _wait_listening(port: int, head: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise AssertionError(f"ray start --head exited with {head.returncode}")
        try:
            probe_tcp(f"127.0.0.1:{port}", 1.0)
            return
        except JoinError:
            time.sleep(0.3)
    raise AssertionError(f"the head did not listen on 127.0.0.1:{port} within {timeout_s} s")


def _head_probe(port: int) -> dict:
    """Alive nodes and free resources of the head, read by a fresh driver (a separate process)."""
    code = ("import json, ray; from moe_runtime.runtime.ray_join import join; "
            f"join('127.0.0.1:{port}', 60, log_to_driver=False); "
            "print(json.dumps({'nodes': sorted(n['NodeID'] for n in ray.nodes() if n['Alive']), "
            "'free': ray.available_resources(), 'total': ray.cluster_resources()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _stop_group(head: subprocess.Popen) -> None:
    """SIGTERM the head's process group (ray start --block stops its processes), SIGKILL what is left."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        head.wait(20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(10)


def test_split_host_port_names_the_field():
    assert split_host_port("127.0.0.1:6379") == ("127.0.0.1", 6379)
    with pytest.raises(JoinError, match=r"cluster.ray_address = '127.0.0.1': expected 'host:port'"):
        split_host_port("127.0.0.1")


@pytest.mark.slow
def test_up_train_forward_down_on_a_real_head(tmp_path):
    port = free_port()
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    head_env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # the head itself binds loopback only
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--block",
         "--num-cpus=2", "--num-gpus=2", f"--temp-dir={temp}", f"--dashboard-port={free_port()}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         "--disable-usage-stats"],
        stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, env=head_env, start_new_session=True)
    name = f"join-{uuid.uuid4().hex[:8]}"
    cfg = tmp_path / "join.yaml"
    cfg.write_text(
        "model: {preset: tiny}\n"
        "train: {steps: 2, batch_size: 4, seq_len: 32, checkpoint_every: 0, checkpoint_dir: " + str(tmp_path / "ck")
        + "}\n"
        "data: {max_files: 60}\n"
        f"cluster: {{ray_address: '127.0.0.1:{port}', connect_timeout_s: 30, num_gpus: 2, expert_actors: 2, "
        "router_workers: 1}\n")
    try:
        _wait_listening(port, head, 45)
        before = _head_probe(port)
        assert len(before["nodes"]) == 1

        up = cli(["--name", name, "up", "--config", str(cfg)])
        assert up.returncode == 0, up.stderr[-3000:]
        assert f"at 127.0.0.1:{port}" in up.stderr and "Ray dashboard: http://" in up.stderr

        tr = cli(["--name", name, "train", "--steps", "3", "--json"])
        assert tr.returncode == 0, tr.stderr[-3000:]
        result = last_json(tr)
        assert len(result["losses"]) == 3 and all(loss > 0 for loss in result["losses"])

        fw = cli(["--name", name, "forward", "--text", "import os", "--json"])
        assert fw.returncode == 0, fw.stderr[-3000:]
        assert len(last_json(fw)["predictions"]) == 5

        st = last_json(cli(["--name", name, "status", "--json"]))
        assert st["step"] == 3 and st["ray_mode"] == "address" and st["nodes"] == before["nodes"]
    finally:
        down = cli(["--name", name, "down"], timeout=120)
        alive = head.poll() is None
        after = _head_probe(port) if alive else None
        _stop_group(head)
        from moe_runtime.runtime.session import log_file

        log_file(name).unlink(missing_ok=True)  # the daemon's log of this test's cluster
    assert down.returncode == 0 and "stopped" in down.stderr, down.stderr[-2000:]
    assert alive, "the head died"
    assert after["nodes"] == before["nodes"]  # same head node: not restarted, not stopped
    assert after["free"].get("GPU") == before["free"].get("GPU") == 2.0  # our actors and placement group are gone


def test_wrong_address_fails_within_the_connect_timeout(tmp_path):
    port = free_port()  # nothing listens there
    cfg = tmp_path / "wrong.yaml"
    cfg.write_text("model: {preset: tiny}\ntrain: {steps: 1, batch_size: 4, seq_len: 32}\n"
                   f"cluster: {{ray_address: '127.0.0.1:{port}', connect_timeout_s: 5, expert_actors: 2, "
                   "router_workers: 1}\n")
    t0 = time.monotonic()
    out = cli(["--name", f"wrong-{uuid.uuid4().hex[:8]}", "train", "--config", str(cfg), "--steps", "1"], timeout=120)
    took = time.monotonic() - t0
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"cluster.ray_address = '127.0.0.1:{port}': nothing answers at 127.0.0.1:{port}" in out.stderr
    assert "GCS port" in out.stderr and "Traceback" not in out.stderr
    assert took < 5 + 30  # the timeout plus interpreter and import start-up on a busy machine
