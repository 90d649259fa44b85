"""recovery.py against real Ray actors: an actor that cannot come back (its node is gone: here, resources no node
has) is named in the error, quickly; one that died for good is named too; a hung one is killed and restarted."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from moe_runtime.runtime.recovery import ClusterError, wait_alive


def _party():
    """A minimal party, defined in a function so Ray ships it by value (test modules are not importable there)."""

    class Party:
        def ping(self) -> int:
            return os.getpid()

        def info(self) -> int:  # what wait_alive returns for expert actors
            return os.getpid()

    return ray.remote(Party)


def test_a_party_that_cannot_come_back_is_named(ray_session):
    stuck = _party().options(num_cpus=0, resources={"a-node-that-is-gone": 1}).remote()
    ok = _party().options(num_cpus=0).remote()
    try:
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match=r"expert actor 1 did not come back within 3 s"):
            wait_alive([ok, stuck], [], timeout=3.0, hang_timeout_s=60.0)
        assert time.monotonic() - t0 < 15
    finally:
        ray.kill(stuck)
        ray.kill(ok)


def test_a_party_that_died_for_good_is_named(ray_session):
    dead = _party().options(num_cpus=0, max_restarts=0).remote()
    pid = ray.get(dead.ping.remote(), timeout=60)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ClusterError, match=r"router worker 0: .*died for good|died for good.*router worker 0"):
        wait_alive([], [dead], timeout=30.0, hang_timeout_s=60.0)


def test_a_hung_party_is_killed_restarted_and_answers(ray_session):
    hung = _party().options(num_cpus=0, max_restarts=1).remote()
    pid = ray.get(hung.ping.remote(), timeout=60)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        infos = wait_alive([hung], [], timeout=60.0, hang_timeout_s=2.0, local=True, expert_pids=[pid])
        assert infos[0] != pid and time.monotonic() - t0 < 30
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        ray.kill(hung)
