"""Operating a named cluster from the CLI: `--steps N` is N more steps, a command that contradicts the running
cluster is refused naming the field and both values, the daemon's log is printed and `logs` shows it, a daemon
killed with -9 has its Ray processes stopped by the next command (which says what it found), and Ctrl-C during
`up` stops the daemon and the Ray it had started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from moe_runtime.runtime.session import _alive, _proc_start, default_name

ROOT = Path(__file__).resolve().parents[2]


def cli(args, env, timeout=240):
    return subprocess.run([sys.executable, "-m", "moe_runtime.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model: {preset: tiny}\n"
        "train: {steps: 2, batch_size: 4, seq_len: 32, checkpoint_every: 0, checkpoint_dir: " + str(tmp_path / "ck")
        + "}\n"
        "data: {max_files: 60}\n"
        "cluster: {num_gpus: 2, expert_actors: 2, router_workers: 1}\n")
    return cfg


def _state(env: dict, name: str) -> dict:
    return json.loads((Path(env["XDG_STATE_HOME"]) / "moe-runtime" / f"{name}.json").read_text())


def test_default_name_is_per_working_directory(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert default_name(a) != default_name(b) and default_name(a).startswith("a-")
    assert default_name(a) == default_name(a)


@pytest.mark.slow
def test_named_cluster_steps_mismatch_logs_and_kill9(tmp_path):
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    name = f"ops-{uuid.uuid4().hex[:6]}"
    cfg = _config(tmp_path)
    up = cli(["--name", name, "up", "--config", str(cfg)], env)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        log = Path(_state(env, name)["log"])
        assert str(log) in up.stderr and log.exists()
        other = cli(["status"], env)  # another name (this directory's default) sees no cluster
        assert other.returncode == 1 and "no cluster is up" in other.stderr

        steps_log = tmp_path / "run.jsonl"
        two = cli(["--name", name, "train", "--steps", "2", "--json", "--steps-log", str(steps_log)], env)
        assert two.returncode == 0, two.stderr[-3000:]
        losses = json.loads(two.stdout.strip().splitlines()[-1])["losses"]
        records = [json.loads(line) for line in steps_log.read_text().splitlines()]
        assert [r["step"] for r in records] == [0, 1] and [r["loss"] for r in records] == losses
        assert all(r["grad_norm"] > 0 and r["step_s"] > 0 and r["imbalance"] >= 1.0 and r["lr"] > 0 for r in records)
        assert "step     1  loss" in two.stderr and "imbalance" in two.stderr
        ck = cli(["--name", name, "checkpoint", str(tmp_path / "ck2")], env)
        assert ck.returncode == 0 and "checkpoint written to" in ck.stderr, ck.stderr[-2000:]
        one = cli(["--name", name, "train", "--steps", "1", "--json"], env)  # fewer than done: 1 more, no IndexError
        assert one.returncode == 0, one.stderr[-3000:]
        assert len(json.loads(one.stdout.strip().splitlines()[-1])["losses"]) == 1
        st = json.loads(cli(["--name", name, "status", "--json"], env).stdout.strip().splitlines()[-1])
        assert st["step"] == 3
        served = sum(a["tokens"] for a in st["expert_actors"] if a.get("tokens") is not None)
        assert sum(map(sum, st["expert_load"])) == sum(map(sum, st["actor_load_per_layer"])) == served > 0
        assert st["expert_map"]["0,0"] == [0]
        back = cli(["--name", name, "restore", str(tmp_path / "ck2")], env)
        assert back.returncode == 0 and "at step 2" in back.stderr, back.stderr[-2000:]

        bad = cli(["--name", name, "train", "--steps", "1", "--router", "linear", "--seed", "3"], env)
        assert bad.returncode == 1
        assert "model.router: the cluster runs 'attention', this command asks for 'linear'" in bad.stderr
        assert "train.seed: the cluster runs 0, this command asks for 3" in bad.stderr

        logs = cli(["--name", name, "logs", "--lines", "5"], env)
        assert logs.returncode == 0 and "ready on 127.0.0.1" in (log.read_text()) and str(log) in logs.stderr

        info = _state(env, name)
        ray_pids = [pid for pid, start, _ in info["ray_pids"] if _proc_start(pid) == start]
        assert ray_pids, info
        os.kill(info["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(info["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        gone = cli(["--name", name, "status"], env)
        assert gone.returncode == 1
        assert f"(pid {info['pid']}) is gone" in gone.stderr and "Ray process(es) it left behind" in gone.stderr
        assert not [pid for pid in ray_pids if _alive(pid) and _proc_start(pid) is not None]
    finally:
        cli(["--name", name, "down"], env, timeout=120)


@pytest.mark.slow
def _interrupt_up_mid_start(tmp_path: Path, attempt: int) -> tuple[subprocess.Popen, str, dict, Path] | None:
    """`up` interrupted once its daemon has started Ray but is still starting the cluster; None when the start
    finished before a poll could catch it mid-way (the window is the cluster launch, a few seconds: a fast or an
    unlucky run can miss it; the daemon is then stopped with `down`)."""
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / f"state{attempt}")}
    name = f"intr-{uuid.uuid4().hex[:6]}"
    state = Path(env["XDG_STATE_HOME"]) / "moe-runtime" / f"{name}.json"
    # a Ctrl-C from a terminal: SIGINT must reach `up` as KeyboardInterrupt even where this test runs with SIGINT
    # ignored (a background job of a shell without job control, e.g. `bash .ci/run &`), which a child inherits
    ours = signal.signal(signal.SIGINT, signal.default_int_handler)  # a handler: the child starts with SIG_DFL
    try:
        proc = subprocess.Popen([sys.executable, "-m", "moe_runtime.cli", "--name", name, "up", "--config",
                                 str(_config(tmp_path))], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, ours)
    info: dict = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                info = json.loads(state.read_text())
            except (OSError, ValueError):
                info = {}
            if info.get("state") == "starting" and info.get("ray_pids"):
                proc.send_signal(signal.SIGINT)  # at once: Ray is up, the cluster is not
                _, stderr = proc.communicate(timeout=90)
                return proc, stderr, info, state
            if info.get("state") == "ready" or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert time.monotonic() < deadline, "Ray never started"
    finally:
        if proc.poll() is None and not info.get("state") == "ready":
            proc.kill()
    proc.communicate(timeout=90)
    subprocess.run([sys.executable, "-m", "moe_runtime.cli", "--name", name, "down"], cwd=ROOT, env=env,
                   timeout=120, capture_output=True)  # fmt: skip
    return None


def test_ctrl_c_during_up_stops_what_it_started(tmp_path):
    for attempt in range(3):
        caught = _interrupt_up_mid_start(tmp_path, attempt)
        if caught is not None:
            break
    assert caught is not None, "the cluster start was never caught mid-way in 3 attempts"
    proc, stderr, info, state = caught
    assert proc.returncode == 130 and "interrupted" in stderr, stderr[-2000:]
    assert not _alive(info["pid"]) and not state.exists()
    assert not [pid for pid, start, _ in info["ray_pids"] if _proc_start(pid) == start and _alive(pid)]
