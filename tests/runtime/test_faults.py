"""Kill processes mid-training: Ray restarts them, the driver rolls every party back to the last automatic
checkpoint and re-runs; the losses equal the clean (oracle) run's."""

from __future__ import annotations

import os
import signal
import threading

import torch

from moe_runtime.model.transformer import expert_param_name


def _kill_during_next_step(pid: int, delay_s: float = 0.03) -> threading.Timer:
    timer = threading.Timer(delay_s, os.kill, (pid, signal.SIGKILL))
    timer.start()
    return timer


def test_expert_actor_killed_mid_training(fresh4, oracle):
    c = fresh4
    victim = c.status()["expert_actors"][2]
    seen: list[int] = []
    before = c.recoveries

    def progress(step: int, loss: float) -> None:
        seen.append(step)
        if step == 2 and c.recoveries == before:  # checkpoints at 0 and 2 (every 2): the kill lands in step 3
            _kill_during_next_step(victim["pid"])

    result = c.train(6, progress=progress)
    assert c.recoveries == before + 1
    assert seen.count(2) == 2 and seen.count(3) == 1 and seen[-1] == 5  # step 2 was re-run after the rollback
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(oracle.losses), rtol=1e-4, atol=0)
    assert abs(result.val_loss - oracle.val_loss_after_6) < 1e-4 * oracle.val_loss_after_6
    status = c.status()
    assert status["healthy"] and status["expert_actors"][2]["pid"] != victim["pid"]


def test_router_worker_killed_mid_training(fresh4, oracle):
    c = fresh4
    victim = c.status()["router_workers"][1]
    before = c.recoveries

    def progress(step: int, loss: float) -> None:
        if step == 1 and c.recoveries == before:
            _kill_during_next_step(victim["pid"], 0.01)

    result = c.train(4, progress=progress)
    assert c.recoveries == before + 1
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(oracle.losses[:4]), rtol=1e-4, atol=0)
    status = c.status()
    assert status["healthy"] and status["router_workers"][1]["pid"] != victim["pid"]
    assert status["router_workers"][1]["collective"]  # the gloo group was formed again
    # and the restarted worker holds the same dense weights as its peer
    d0, d1 = c.dense_state(0), c.dense_state(1)
    assert all(torch.equal(d0[k], d1[k]) for k in d0)
    w = c.expert_weights()
    assert w[expert_param_name(0, "w1")].shape[0] == 8
