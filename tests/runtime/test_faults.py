"""Kill processes mid-training: Ray restarts them, the driver rolls every party back to the last automatic
checkpoint and re-runs; the losses equal the clean (oracle) run's."""

from __future__ import annotations

import os
import signal
import threading

import pytest
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


# ---------------------------------------------------------------------------------------------- issue 16


def _pid(handle) -> int:
    import ray

    return ray.get(handle.ping.remote(), timeout=60)


def _wait_dead(pid: int, timeout_s: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def test_router_worker_killed_during_the_all_reduce_is_a_fault(fresh4, oracle, monkeypatch):
    """The surviving worker's gloo error reaches the driver first; it is a fault like any other: train() rolls back
    and replays (before: `sync_grads ... Connection reset by peer` aborted train())."""
    import ray

    from moe_runtime.runtime import step as step_mod
    from moe_runtime.runtime.recovery import is_fault

    c = fresh4
    # 1. the error itself, deterministically: worker 0 alone in the all-reduce, its peer dead
    ray.get([w.forward_backward.remote(0) for w in c.workers], timeout=300)
    victim = _pid(c.workers[1])
    os.kill(victim, signal.SIGKILL)
    _wait_dead(victim)
    try:
        ray.get(c.workers[0].sync_grads.remote(), timeout=120)
        raise AssertionError("the all-reduce with a dead peer did not fail")
    except ray.exceptions.RayTaskError as err:
        assert "all-reduce" in str(err) and is_fault(err), err
    c.recover(c.init_ckpt)
    assert c.step == 0
    # 2. through train(): the kill lands right before the dense-grad all-reduce of step 1
    original = step_mod._sync_dense_grads
    fired: list[int] = []

    def kill_then_sync(fleet, cfg):
        if not fired:  # worker 0 this time: every party has only cluster.max_restarts lives in the session
            pid = _pid(fleet.workers[0])
            os.kill(pid, signal.SIGKILL)
            _wait_dead(pid)
            fired.append(pid)
        return original(fleet, cfg)

    monkeypatch.setattr(step_mod, "_sync_dense_grads", kill_then_sync)
    before = c.recoveries
    result = c.train(4)
    assert fired and c.recoveries == before + 1
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(oracle.losses[:4]), rtol=1e-4, atol=0)


def _listening(pid: int) -> list[tuple[str, int]]:
    import psutil

    return [(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN]  # fmt: skip


def _is_loopback(ip: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # "::ffff:127.0.0.1": an IPv6 socket bound to IPv4 loopback
    return (mapped or addr).is_loopback


def test_every_listener_of_the_cluster_binds_loopback(cluster4):
    """What `ss -tlnp` shows for this cluster's processes (router workers, expert actors): every listening socket
    is on 127.0.0.1 (before: torch's TCPStore for gloo listened on every interface on router worker 0)."""
    import ray  # noqa: F401  (ray ships psutil)

    c = cluster4
    assert c.status()["router_workers"][0]["collective"]  # the gloo group exists, so its store would too
    pids = [_pid(h) for h in c.workers + c.experts]
    found = {pid: _listening(pid) for pid in pids}
    assert all(found.values()), found  # every process listens somewhere (Ray's core worker, gRPC servers)
    public = {pid: [a for a in addrs if not _is_loopback(a[0])] for pid, addrs in found.items()}
    assert not any(public.values()), public


def _with_hang_timeout(c, seconds: float):
    old = (c.cfg, c.fleet.timeout_s)
    c.cfg = c.cfg.model_copy(update={"cluster": c.cfg.cluster.model_copy(update={"hang_timeout_s": seconds})})
    c.fleet.timeout_s = seconds
    return old


def test_actor_stopped_in_a_control_call_is_named_killed_and_recovered(fresh4, oracle, runtime_tmp):
    """SIGSTOP an expert actor: the next control call fails within the deadline naming it; recovery kills it (Ray
    restarts it) instead of waiting 180 s, and training goes on with the oracle's losses."""
    import time

    import ray

    c = fresh4
    deadline = 3.0
    old = _with_hang_timeout(c, deadline)
    pid = _pid(c.experts[1])
    try:
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            c.checkpoint(runtime_tmp / "hang")
            raise AssertionError("a checkpoint with a stopped actor did not fail")
        except ray.exceptions.GetTimeoutError as err:
            detected = time.monotonic() - t0
            assert "expert actor 1" in str(err) and "checkpoint save" in str(err), err
        assert detected < 2 * deadline, detected
        t1 = time.monotonic()
        c.recover(c.init_ckpt)  # pings, finds actor 1 hung, kills it, waits for Ray's restart, rolls back
        recovered = time.monotonic() - t1
        assert _pid(c.experts[1]) != pid
        print(f"hang detected in {detected:.2f} s, recovered in {recovered:.2f} s")
    finally:
        c.cfg, c.fleet.timeout_s = old
        try:
            os.kill(pid, signal.SIGKILL)  # never leave a stopped process behind
        except ProcessLookupError:
            pass
    result = c.train(2)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(oracle.losses[:2]), rtol=1e-4, atol=0)


def test_kill_during_rebalance_is_not_left_half_migrated(fresh4, oracle, runtime_tmp, monkeypatch):
    """An actor killed while migration loads copies on it: the rebalance fails, the cluster is whole again (every
    actor at the cluster's placement version with exactly its shards), and the next train() matches the oracle
    (before: one actor at the new version, then a KeyError from ExpertActor.save())."""
    from moe_runtime.scheduler.migrate import MigrationError

    c = fresh4
    c.checkpoint(runtime_tmp / "before-rebalance")  # of step 0: the dead actor's only copies come back from it
    old = c.placement
    rows = [list(r) for r in old.replicas]
    rows[0][0] = tuple(rows[0][0]) + (3,)  # replicate (0, 0) onto actor 3 ...
    rows[1][7] = (1,)  # ... and move (1, 7) to actor 1
    new = old.with_replicas(tuple(tuple(r) for r in rows))
    victim = _pid(c.experts[3])
    original = c.fleet.load_shards

    def kill_then_load(shards_by_actor, version):
        os.kill(victim, signal.SIGKILL)
        _wait_dead(victim)
        return original(shards_by_actor, version)

    monkeypatch.setattr(c.fleet, "load_shards", kill_then_load)
    with pytest.raises(MigrationError, match="the cluster was"):
        c.rebalance(new)
    monkeypatch.undo()
    status = c.status()
    assert status["healthy"], [a["health"] for a in status["expert_actors"]]
    assert all(a["placement_version"] == c.placement.version for a in status["expert_actors"])
    assert _pid(c.experts[3]) != victim
    result = c.train(4)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(oracle.losses[:4]), rtol=1e-4, atol=0)


def test_corrupt_newest_checkpoint_restores_the_previous_good_one(fresh4, oracle, runtime_tmp):
    from moe_runtime.checkpoint import training_state as ckpt

    c = fresh4
    root = runtime_tmp / "corrupt"
    c.checkpoint(root)  # step 0
    c.train_step()
    c.train_step()
    newest = c.checkpoint(root)  # step 2
    f = newest / "experts-a0.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.load_manifest(root)
    assert c.restore(root) == 0  # before: `sha256 does not match the manifest` stopped the restore
    losses = [c.train_step().loss for _ in range(2)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(oracle.losses[:2]), rtol=1e-4, atol=0)


@pytest.mark.slow
def test_expert_actor_killed_with_replicas_reruns_only_the_failed_step(fresh4, oracle):
    """Every expert of the killed actor has a live replica: its replacement copies weights and AdamW state from
    them and only the failed step is re-run (no rollback); the losses equal the clean run's."""
    from tests.runtime.test_failover import _replicate_actor

    c = fresh4
    c.rebalance(_replicate_actor(c, 0))
    victim = _pid(c.experts[0])
    seen: list[int] = []
    before, rerun_before = c.recoveries, c.steps_rerun

    def progress(step: int, loss: float) -> None:
        seen.append(step)
        if step == 2 and c.recoveries == before:
            _kill_during_next_step(victim)

    result = c.train(6, progress=progress)
    assert c.recoveries == before + 1 and c.steps_rerun == rerun_before + 1
    assert seen == [0, 1, 2, 3, 4, 5]  # nothing before the failed step ran twice
    assert result.extra["steps_rerun"] == rerun_before + 1
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(oracle.losses), rtol=1e-4, atol=0)
    assert _pid(c.experts[0]) != victim and c.status()["healthy"]
