"""`moe-runtime generate` and `forward --generate` through the `up` daemon (events streamed back over the control
channel) give the in-process engine's tokens."""

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


def last_json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_generate_through_the_daemon_equals_in_process(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {preset: tiny}\ntrain: {batch_size: 4, seq_len: 32}\ndata: {max_files: 40}\n"
                   "cluster: {num_gpus: 2, expert_actors: 2, router_workers: 1}\n")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    gen = ["generate", "--config", str(cfg), "--prompt", "def f(", "--token-ids", "256,105,109", "--max-new-tokens",
           "6", "--temperature", "0.7", "--seed", "11", "--json"]
    try:
        up = cli(["up", "--config", str(cfg)], env)
        assert up.returncode == 0, up.stderr[-3000:]
        on_cluster = last_json(cli(gen, env))
        forward = last_json(cli(["forward", "--config", str(cfg), "--text", "import", "--generate", "4", "--json"],
                                env))
    finally:
        cli(["down"], env, timeout=120)
    in_process = last_json(cli([*gen, "--in-process"], env))
    assert on_cluster["new_token_ids"] == in_process["new_token_ids"]
    assert [len(t) for t in on_cluster["new_token_ids"]] == [6, 6] or "stop" in on_cluster["finish_reason"]
    local_fw = last_json(cli(["forward", "--config", str(cfg), "--text", "import", "--generate", "4", "--json",
                              "--in-process"], env))
    assert forward["continuation_ids"] == local_fw["continuation_ids"]
