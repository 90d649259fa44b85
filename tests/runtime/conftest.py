"""Shared Ray fixtures for the runtime tests: ONE local Ray per session, one 4-actor cluster, one oracle run.

The session Ray advertises 6 fake GPUs: the 4-expert-actor cluster holds 4 of them for the whole session and a
2-actor cluster (resharding tests) takes 2 more, so both can exist at once without restarting anything.
Every test that trains starts by restoring `init_ckpt` (the step-0 state) so tests do not depend on order.
Simulated multi-node runs in a subprocess with its own Ray (test_cluster.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moe_runtime.config import ClusterConfig
from tests.runtime.helpers import ORACLE_STEPS, SESSION_GPUS, make_config


@dataclass
class OracleRun:
    losses: list[float]
    aux: list[float]
    loads: list[torch.Tensor]  # per step [L, E]
    state_after_5: dict[str, torch.Tensor]
    probe: torch.Tensor  # tokens [B, S]
    logits_after_5: torch.Tensor
    val_loss_after_6: float


@pytest.fixture(scope="session")
def runtime_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runtime")


@pytest.fixture(scope="session")
def ray_session():
    from moe_runtime.runtime.ray_env import start_ray

    env = start_ray(ClusterConfig(num_gpus=SESSION_GPUS, expert_actors=4), log_to_driver=False)
    yield env
    env.shutdown()


@pytest.fixture(scope="session")
def oracle(runtime_tmp) -> OracleRun:
    from moe_runtime.training import InProcessTrainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like every actor; multi-threaded torch on a busy 2-core machine crawls
    try:
        return _run_oracle(InProcessTrainer(make_config(runtime_tmp)))
    finally:
        torch.set_num_threads(threads)


def _run_oracle(tr) -> OracleRun:
    losses, aux, loads = [], [], []
    probe = tr.loader.batch(1000)[0]
    state5 = logits5 = None
    for step in range(ORACLE_STEPS):
        lm, a, load = tr.train_step(step)
        losses.append(lm)
        aux.append(a)
        loads.append(load)
        if step == 4:
            state5 = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
            tr.model.eval()
            with torch.no_grad():
                logits5 = tr.model(probe).logits
    return OracleRun(losses, aux, loads, state5, probe, logits5, tr.evaluate())


@pytest.fixture(scope="session")
def cluster4(ray_session, runtime_tmp):
    from moe_runtime.runtime.cluster import Cluster

    c = Cluster.start(make_config(runtime_tmp))
    c.init_ckpt = c.checkpoint(runtime_tmp / "init")
    yield c
    c.shutdown()


@pytest.fixture
def fresh4(cluster4, runtime_tmp):
    """The session cluster back at step 0 with the oracle's initial weights."""
    cluster4.restore(runtime_tmp / "init")
    assert cluster4.step == 0
    return cluster4
