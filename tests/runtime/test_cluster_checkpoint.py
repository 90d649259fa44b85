"""Checkpoints: files and manifest, restore onto 4 -> 2 and 2 -> 4 expert actors, a save killed half-way."""

from __future__ import annotations

import os
import resource
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from moe_runtime.checkpoint import training_state as ckpt
from tests.runtime.helpers import make_config


@pytest.fixture(scope="module")
def cluster2(ray_session, runtime_tmp):
    from moe_runtime.runtime.cluster import Cluster

    c = Cluster.start(make_config(runtime_tmp / "c2", expert_actors=2, grad_sync="ray"))  # + the other grad sync
    yield c
    c.shutdown()


def _close(a, b, rtol=1e-5):
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=rtol, atol=0)


def _save(root, step, tensors):
    d = ckpt.new_step_dir(root, step)
    recs = [ckpt.write_tensor_file(d / ckpt.DENSE_FILE, tensors, kind="dense"),
            ckpt.write_expert_file(d / "experts-a0.safetensors", {(0, 0): {"w1": tensors["model.w"]}})]
    return d, ckpt.Manifest(step=step, config={}, placement={}, files=recs)


def test_commit_order_and_pruning_without_ray(tmp_path):
    """Pure file level: LATEST moves only at commit; uncommitted directories never become visible and are pruned,
    with the `keep` newest committed ones."""
    t = {"model.w": torch.arange(6.0).reshape(2, 3)}
    assert ckpt.latest_dir(tmp_path) is None
    d1, m1 = _save(tmp_path, 1, t)
    with pytest.raises(ckpt.CheckpointError, match="no committed checkpoint"):
        ckpt.load_manifest(tmp_path)
    ckpt.commit(d1, m1)
    d2, _ = _save(tmp_path, 2, {"model.w": t["model.w"] + 1})  # written, never committed (killed here)
    assert ckpt.latest_dir(tmp_path) == d1
    assert torch.equal(ckpt.read_dense(ckpt.load_manifest(tmp_path))["model.w"], t["model.w"])
    d3, m3 = _save(tmp_path, 3, t)
    ckpt.commit(d3, m3, keep=2)
    d4, m4 = _save(tmp_path, 4, t)
    ckpt.commit(d4, m4, keep=2)
    assert not d2.exists() and not d1.exists() and d3.exists() and ckpt.latest_dir(tmp_path) == d4
    (d4 / "experts-a0.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.load_manifest(tmp_path)
    d5, m5 = _save(tmp_path, 5, t)
    (d5 / ckpt.DENSE_FILE).write_bytes(b"short")
    with pytest.raises(ckpt.CheckpointError, match="not committing"):
        ckpt.commit(d5, m5)
    assert ckpt.latest_dir(tmp_path) == d4


def test_adamw_state_round_trip_continues_identically():
    from moe_runtime.training import make_adamw
    from tests.runtime.helpers import make_config

    train = make_config(Path("/nonexistent")).train
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = make_adamw(model.named_parameters(), train)
    x = torch.randn(5, 4)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    saved = {k: v.clone() for k, v in ckpt.dense_tensors(model, opt).items()}
    assert {"opt.0.weight.exp_avg", "opt.1.bias.step"} <= set(saved)
    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    twin_opt = make_adamw(twin.named_parameters(), train)
    ckpt.load_dense_tensors(twin, twin_opt, saved)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.load_dense_tensors(twin, twin_opt, {k: v for k, v in saved.items() if k != "model.1.bias"})


def test_manifest_and_files(fresh4, runtime_tmp):
    c = fresh4
    c.train_step()
    d = c.checkpoint(runtime_tmp / "files")
    m = ckpt.load_manifest(runtime_tmp / "files")  # follows LATEST, verifies every sha256
    assert m.directory == d and m.step == 1
    assert sorted(f.name for f in m.files) == ["dense.safetensors"] + [f"experts-a{i}.safetensors" for i in range(4)]
    assert sorted(k for f in m.files for k in f.shards) == [(l, e) for l in range(2) for e in range(8)]
    assert m.placement == c.placement.to_dict() and m.config["model"]["num_experts"] == 8
    shard = ckpt.read_expert_shards(m, [(1, 5)])[(1, 5)]
    assert set(shard) == {"w1", "w2"} | {f"{w}.{f}" for w in ("w1", "w2") for f in ckpt.OPT_FIELDS}
    assert float(shard["w1.step"]) == 1.0 and shard["w1"].shape == (64, 256)
    # a flipped byte is caught before anything is loaded
    target = d / "experts-a2.safetensors"
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="sha256 does not match"):
        ckpt.load_manifest(runtime_tmp / "files")


def test_reshard_4_to_2_and_2_to_4(fresh4, cluster2, oracle, runtime_tmp):
    c4, c2 = fresh4, cluster2
    first = c4.train(3)  # auto checkpoints at steps 0 and 2
    c4.checkpoint(runtime_tmp / "a")  # step 3, written by 4 actors
    tail4 = c4.train(5).losses  # steps 3, 4 on 4 actors
    _close(first.losses + tail4, oracle.losses[:5], rtol=1e-4)

    assert c2.restore(runtime_tmp / "a") == 3  # 4 -> 2
    assert [len(c2.placement.shards_of(a)) for a in range(2)] == [8, 8]
    c2.checkpoint(runtime_tmp / "b")  # the same state, now written by 2 actors
    assert len(ckpt.load_manifest(runtime_tmp / "b").files) == 3
    tail2 = c2.train(5).losses
    _close(tail2, tail4)

    assert c4.restore(runtime_tmp / "b") == 3  # 2 -> 4
    _close(c4.train(5).losses, tail4)
    w2, w4 = c2.expert_weights(), c4.expert_weights()
    assert all(torch.allclose(w2[k], w4[k], rtol=1e-5, atol=1e-7) for k in w4)


def _new_dirs(root, step):
    return [d for d in root.iterdir() if d.name.startswith(f"step-{step:08d}")]


def test_save_killed_half_way_keeps_previous(fresh4, oracle, runtime_tmp):
    """Expert actor 1 is frozen (SIGSTOP) before a save and killed (SIGKILL) once every other party has written
    its file: the save dies half-way. LATEST still names the previous checkpoint, which loads and continues
    exactly; the half-written directory is removed by the next good save."""
    import ray

    c = fresh4
    root = runtime_tmp / "killed"
    c.train(2)
    good = c.checkpoint(root)
    c.train(3)
    victim = c.status()["expert_actors"][1]
    os.kill(victim["pid"], signal.SIGSTOP)
    pool = ThreadPoolExecutor(1)
    try:
        save = pool.submit(c.checkpoint, root)
        others = {"dense.safetensors", "experts-a0.safetensors", "experts-a2.safetensors", "experts-a3.safetensors"}
        deadline = time.monotonic() + 60
        while not (_new_dirs(root, 3) and others <= {f.name for f in _new_dirs(root, 3)[0].iterdir()}):
            assert time.monotonic() < deadline and not save.done(), "the other parties never wrote their files"
            time.sleep(0.02)
    finally:
        os.kill(victim["pid"], signal.SIGKILL)
        pool.shutdown(wait=False)
    with pytest.raises(ray.exceptions.RayActorError):
        save.result(timeout=120)
    assert ckpt.latest_dir(root) == good
    partial = _new_dirs(root, 3)
    assert len(partial) == 1 and not (partial[0] / ckpt.MANIFEST).exists()
    assert "experts-a1.safetensors" not in {f.name for f in partial[0].iterdir()}
    assert ckpt.load_manifest(root).step == 2

    assert c.recover(root) == 2  # actor restarted by Ray, every party rolled back
    assert c.status()["expert_actors"][1]["pid"] != victim["pid"]
    _close(c.train(5).losses, oracle.losses[2:5], rtol=1e-4)
    c.checkpoint(root)  # the next good save removes the half-written directory
    assert not partial[0].exists()


def test_save_failing_mid_file_keeps_previous(fresh4, oracle, runtime_tmp):
    """A shard write fails after 4 KB (file-size limit set on the actor's process: EFBIG, like a full disk)."""
    c = fresh4
    root = runtime_tmp / "efbig"
    good = c.checkpoint(root)
    c.train(1)
    pid = c.status()["expert_actors"][2]["pid"]
    old = resource.prlimit(pid, resource.RLIMIT_FSIZE, (4096, resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]))
    try:  # its shard file is ~600 KB
        with pytest.raises(OSError, match="File too large"):
            c.checkpoint(root)
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, old)
    (partial,) = _new_dirs(root, 1)
    assert (partial / "experts-a2.safetensors").stat().st_size == 4096
    assert ckpt.latest_dir(root) == good and ckpt.load_manifest(root).step == 0
    assert c.recover(root) == 0
    _close(c.train(2).losses, oracle.losses[:2], rtol=1e-4)
