"""The CLI round trip on a real local cluster: up -> status -> train -> forward -> down (a daemon owns the cluster)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "moe_runtime.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.slow
def test_up_status_train_forward_down(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model: {preset: tiny}\n"
        "train: {steps: 2, batch_size: 4, seq_len: 32, checkpoint_dir: " + str(tmp_path / "ckpt") + "}\n"
        "data: {max_files: 60}\n"
        "cluster: {num_gpus: 2, expert_actors: 2, router_workers: 1}\n")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    try:
        up = cli(["up", "--config", str(cfg)], env)
        assert up.returncode == 0, up.stderr[-3000:]
        assert "cluster is up" in up.stderr

        again = cli(["up", "--config", str(cfg)], env)
        assert again.returncode == 1 and "already up" in again.stderr

        st = cli(["status", "--json", "--heatmap", str(tmp_path / "load.png")], env)
        assert st.returncode == 0, st.stderr[-3000:]
        status = json.loads(st.stdout.strip().splitlines()[-1])
        assert status["healthy"] and len(status["expert_actors"]) == 2 and status["step"] == 0
        assert (tmp_path / "load.png").stat().st_size > 1000

        tr = cli(["train", "--config", str(cfg), "--steps", "2", "--json", "--record-trace",
                  str(tmp_path / "trace.jsonl")], env)  # fmt: skip
        assert tr.returncode == 0, tr.stderr[-3000:]
        result = json.loads(tr.stdout.strip().splitlines()[-1])
        assert len(result["losses"]) == 2 and "placement" in result and "actor_load" in result
        # the daemon wrote the routing trace; the simulator replays it
        sim = cli(["simulate", "--config", str(cfg), "--trace", result["trace"], "--json"], env)
        assert sim.returncode == 0, sim.stderr[-3000:]
        assert json.loads(sim.stdout.strip().splitlines()[-1])["step_time_s"] > 0

        fw = cli(["forward", "--config", str(cfg), "--text", "import os", "--json"], env)
        assert fw.returncode == 0, fw.stderr[-3000:]
        preds = json.loads(fw.stdout.strip().splitlines()[-1])["predictions"]
        assert len(preds) == 5 and abs(sum(p["prob"] for p in preds)) <= 1.0

        st2 = json.loads(cli(["status", "--json"], env).stdout.strip().splitlines()[-1])
        assert st2["step"] == 2  # the daemon kept the trained state between CLI calls
    finally:
        down = cli(["down"], env, timeout=120)
    assert down.returncode == 0 and "cluster stopped" in down.stderr
    gone = cli(["status"], env)
    assert gone.returncode == 1 and "no cluster is up" in gone.stderr
