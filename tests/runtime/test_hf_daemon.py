"""`up --checkpoint DIR` keeps an HF-loaded cluster running: `forward --json` answers from it (equal to the official
float64 forward), `export --checkpoint-out` writes through it (bit for bit), a call naming another checkpoint is
refused, and `down` stops it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.checkpoint.official import official_forward, rel_err
from tests.runtime.hf_fixtures import make_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def cli(args, env, timeout=400):
    return subprocess.run([sys.executable, "-m", "moe_runtime.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.slow
def test_up_with_a_checkpoint_then_forward_and_export_through_it(tmp_path) -> None:
    from safetensors.torch import load_file

    directory, cfg, weights = make_checkpoint(tmp_path / "ck", shards=1)
    other, _, _ = make_checkpoint(tmp_path / "other", shards=1, tokenizer=False, seed=1)
    conf = tmp_path / "c.yaml"
    conf.write_text("cluster: {num_gpus: 0, gpus_per_expert_actor: 0, expert_actors: 2, router_workers: 1}\n"
                    "train: {batch_size: 2, seq_len: 16}\n")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    try:
        up = cli(["up", "--config", str(conf), "--checkpoint", str(directory)], env)
        assert up.returncode == 0, up.stderr[-3000:]
        fw = cli(["forward", "--checkpoint", str(directory), "--token-ids", "5,17,42", "--json"], env)
        assert fw.returncode == 0, fw.stderr[-3000:]
        out = json.loads(fw.stdout.strip().splitlines()[-1])
        want = official_forward(cfg, weights, torch.tensor([[5, 17, 42]]))[0][0, -1]
        assert rel_err(torch.tensor(out["last_logits"], dtype=torch.float64), want) < 1e-4
        refused = cli(["forward", "--checkpoint", str(other), "--token-ids", "1", "--json"], env)
        assert refused.returncode == 2 and "moe-runtime down" in refused.stderr
        ex = cli(["export", "--checkpoint-out", str(tmp_path / "out"), "--json"], env)
        assert ex.returncode == 0, ex.stderr[-3000:]
        stored = load_file(str(tmp_path / "out" / "model.safetensors"))
        assert all(torch.equal(stored[k], weights[k]) for k in stored) and len(stored) == len(weights) - 1
    finally:
        down = cli(["down"], env, timeout=120)
    assert down.returncode == 0
