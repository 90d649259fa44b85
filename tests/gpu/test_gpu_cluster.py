"""A 2-actor local cluster training step on the GPU against the in-process CPU trainer (same seeds): losses and
the weights after the steps. In a subprocess with its own Ray (tests/gpu/gpu_cluster_step.py), so a Ray another
test started (with fake GPUs) cannot hide the real one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.gpu.gpu_marks import GPU

ROOT = Path(__file__).resolve().parents[2]


def _run(device: str, precision: str = "fp32", steps: int = 2) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.gpu.gpu_cluster_step", "--device", device, "--steps",
                           str(steps), "--precision", precision], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The CPU layout of the same script (`python -m tests.gpu.gpu_cluster_step --device cpu`) is what
# tests/runtime/test_cluster.py already checks with the session cluster; a second Ray here would add a minute.
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=GPU, id="cuda")])
def test_cluster_steps_match_in_process_cpu(device):
    r = _run(device)
    assert r["actor_devices"] == [device, device] and r["worker_devices"] == [device, device]
    rtol = 1e-4 if device == "cpu" else 1e-3  # CUDA kernels round differently from the CPU's
    torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(r["oracle_losses"]), rtol=rtol, atol=0)
    assert r["compared_tensors"] > 0 and r["max_rel_weight_diff"] < (1e-4 if device == "cpu" else 1e-3)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=GPU, id="cuda")])
def test_cluster_bf16_steps_near_fp32(device):
    r = _run(device, "bf16")
    assert r["actor_devices"] == [device, device]
    torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(r["oracle_losses"]), rtol=2e-2, atol=0)
