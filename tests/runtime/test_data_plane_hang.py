"""Hangs in the DATA plane (SIGSTOP while a forward or a training step is in flight, not in a control call): found
within 2x the configured deadline, the hung party named, killed, restarted and repaired; the answers and losses
equal the in-process oracle's. Own 2-actor cluster (every expert on both actors) with short deadlines:
transport.deadline_s 3 s (expert exchanges), cluster.hang_timeout_s 6 s (driver calls, pings, stragglers)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
import torch

from moe_runtime.placement import Placement
from tests.runtime.helpers import make_config
from tests.stopped import wait_stopped

DEADLINE_S = 3.0
HANG_S = 6.0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hang2(ray_session, runtime_tmp):
    from moe_runtime.runtime.cluster import Cluster

    cfg = make_config(runtime_tmp / "hang2", train={"checkpoint_every": 0}, expert_actors=2, hang_timeout_s=HANG_S,
                      max_restarts=6)  # fmt: skip
    cfg = cfg.model_copy(update={"transport": cfg.transport.model_copy(update={"deadline_s": DEADLINE_S})})
    c = Cluster.start(cfg)
    m = cfg.model
    both = tuple(tuple((0, 1) for _ in range(m.num_experts)) for _ in range(m.num_layers))
    c.rebalance(Placement(2, both))  # every expert on both actors: either one may hang
    c.init_ckpt = c.checkpoint(runtime_tmp / "hang2-init")  # step 0, with that placement
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def probe(oracle):
    """The oracle's probe rows, 16 times: a forward that lasts well past the 0.02-0.05 s before the SIGSTOP, so
    the stop lands while the request is in flight (a too-short forward would finish first)."""
    return oracle.probe.repeat(16, 1)


@pytest.fixture
def oracle_logits0(hang2, probe):
    """The in-process model at step 0 (the cluster's initial weights) on the probe."""
    from moe_runtime.model.transformer import build_model

    with torch.no_grad():
        return build_model(hang2.cfg.model, seed=hang2.cfg.train.seed).eval()(probe).logits


def _stop_soon(pid: int, delay_s: float = 0.05) -> threading.Timer:
    timer = threading.Timer(delay_s, os.kill, (pid, signal.SIGSTOP))
    timer.start()
    return timer


def _forward_meeting_the_stop(c, probe: torch.Tensor, pid: int, delay_s: float, bound_s: float):
    """A forward with `pid` SIGSTOPped `delay_s` after it starts: (logits, seconds to answer). When the forward
    finished before the stop landed (a fast data plane can), a second one is sent once `pid` really is stopped:
    that one meets the stopped party."""
    timer = _stop_soon(pid, delay_s)
    t0 = time.monotonic()
    got = c.forward(probe)
    answered = time.monotonic() - t0
    timer.join()
    if answered < bound_s:  # not met: the stop landed after the answer
        wait_stopped(pid)
        t0 = time.monotonic()
        got = c.forward(probe)
        answered = time.monotonic() - t0
    return got, answered


def _reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)  # never leave a stopped process behind
    except ProcessLookupError:
        pass


def _step0(c) -> None:
    c.wait_healed()
    c.heal()  # a party an earlier test left restarting is waited for and repaired first
    c.restore(c.init_ckpt)
    assert c.step == 0 and c.status()["healthy"]


def test_expert_actor_stopped_mid_forward(hang2, probe, oracle_logits0, caplog):
    c = hang2
    _step0(c)
    want = c.forward(probe)
    torch.testing.assert_close(want, oracle_logits0, rtol=1e-4, atol=1e-5)
    pid = c.actor_infos[1].pid
    caplog.set_level(logging.WARNING)
    try:
        got, answered = _forward_meeting_the_stop(c, probe, pid, 0.05, DEADLINE_S)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert DEADLINE_S <= answered < 2 * DEADLINE_S, answered  # the deadline fired on the stopped actor
        c.wait_healed(120)  # pings, finds actor 1 hung, kills it, Ray restarts it, shards copied from actor 0
        assert c.actor_infos[1].pid != pid and c.status()["healthy"]
        # the deadline already caught it: one short ping, not hang_timeout_s more (runtime/hung_parties.py)
        assert "expert actor 1 did not answer a ping within 1 s (a deadline caught it already)" in caplog.text
        torch.testing.assert_close(c.forward(probe), want, rtol=1e-5, atol=1e-6)
        print(f"expert actor stopped mid-forward: answered in {answered:.2f} s (deadline {DEADLINE_S} s)")
    finally:
        _reap(pid)


def test_router_worker_stopped_mid_forward(hang2, probe, oracle_logits0, caplog):
    c = hang2
    _step0(c)
    pid = c.worker_pids[1]
    caplog.set_level(logging.WARNING)
    try:
        got, answered = _forward_meeting_the_stop(c, probe, pid, 0.02, HANG_S)  # worker 1's rows go to worker 0
        torch.testing.assert_close(got, oracle_logits0, rtol=1e-4, atol=1e-5)
        assert HANG_S <= answered < 2 * HANG_S, answered  # worker 1 was stopped with the request in flight
        assert "router worker 1 (no answer within 6 s: hung)" in caplog.text, caplog.text
        c.wait_healed(180)  # kills it; the restarted worker gets worker 0's dense state
        assert "router worker 1 did not answer a ping within 1 s (a deadline caught it already)" in caplog.text
        assert c.worker_pids[1] != pid and c.status()["healthy"], c.last_heal_error
        torch.testing.assert_close(c.forward(probe), oracle_logits0, rtol=1e-4, atol=1e-5)
        print(f"router worker stopped mid-forward: answered in {answered:.2f} s (hang_timeout {HANG_S} s)")
    finally:
        _reap(pid)


@pytest.mark.parametrize("party", ["expert actor 1", "router worker 1"])
def test_party_stopped_mid_step_reruns_only_that_step(hang2, oracle, caplog, party):
    c = hang2
    _step0(c)
    pid = c.actor_infos[1].pid if party.startswith("expert") else c.worker_pids[1]
    caplog.set_level(logging.WARNING)
    stopped: list[float] = []

    def progress(step: int, loss: float) -> None:
        if step == 0 and not stopped:
            # stopped for sure before step 1 sends its forward/backward: a stop landing a moment later could miss
            # it on a fast step and hit the dense-grad all-reduce instead (test_router_worker_stopped_in_the_all_reduce)
            os.kill(pid, signal.SIGSTOP)
            wait_stopped(pid)
            stopped.append(time.monotonic())

    try:
        rerun0 = c.steps_rerun
        result = c.train(3, progress=progress)  # checkpoint_every 0: a rollback would raise
        torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(oracle.losses[:3]), rtol=1e-4, atol=0)
        assert c.steps_rerun == rerun0 + 1
        # recovery killed it after one short ping: the step's deadline had caught it (runtime/hung_parties.py)
        assert f"{party} did not answer a ping within 1 s (a deadline caught it already)" in caplog.text, caplog.text
        if party.startswith("router"):  # the step itself named it: it did not finish when its peer had
            assert "router worker 1 did not finish within 6 s of the first (hung)" in caplog.text, caplog.text
        new = c.actor_infos[1].pid if party.startswith("expert") else c.worker_pids[1]
        assert new != pid
    finally:
        _reap(pid)


def test_router_worker_stopped_in_the_all_reduce(hang2, oracle, caplog, monkeypatch):
    """SIGSTOP of a router worker right before the dense-grad all-reduce: its peer blocks inside gloo, so the
    driver's wait (hang_timeout_s, not gloo's 60 s) finds both silent; the ping names and kills the stopped one,
    which ends the peer's all-reduce, and only that step re-runs."""
    from moe_runtime.runtime import step as step_mod

    c = hang2
    _step0(c)
    pid = c.worker_pids[1]
    caplog.set_level(logging.WARNING)
    original = step_mod._sync_dense_grads
    stopped: list[float] = []

    def stop_then_sync(fleet, cfg):
        if not stopped:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(time.monotonic())
        return original(fleet, cfg)

    monkeypatch.setattr(step_mod, "_sync_dense_grads", stop_then_sync)
    found: list[float] = []
    handler = logging.Handler()
    handler.emit = lambda record: found.append(time.monotonic()) if "did not answer a ping" in record.getMessage() else None
    logging.getLogger().addHandler(handler)
    try:
        rerun0 = c.steps_rerun
        result = c.train(3)  # checkpoint_every 0: a rollback would raise
        torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(oracle.losses[:3]), rtol=1e-4, atol=0)
        assert c.steps_rerun == rerun0 + 1
        assert "router worker 1 did not answer a ping" in caplog.text, caplog.text
        assert stopped and found and found[0] - stopped[0] < 2 * HANG_S, (stopped, found)  # the bound
        assert c.worker_pids[1] != pid
    finally:
        logging.getLogger().removeHandler(handler)
        _reap(pid)
