"""A checkpoint written by an expert actor on one device loads on another and back: weights and AdamW state
bit for bit, and the next optimizer step agrees. In process (no Ray): ExpertActor with an explicit device.

cpu -> cpu runs everywhere (the same calls with device="cpu"); the CUDA legs need a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from moe_runtime.checkpoint import training_state as ckpt
from moe_runtime.config import parse_config
from moe_runtime.placement import Placement
from moe_runtime.runtime.expert_actor import ExpertActor
from tests.gpu.gpu_marks import GPU

KEYS = [(0, 0), (0, 1), (1, 3)]


def _config(precision: str = "fp32") -> dict:
    return parse_config({"model": {"preset": "tiny"}, "train": {"precision": precision},
                         "cluster": {"num_gpus": 1, "expert_actors": 1}}).model_dump(mode="json")  # fmt: skip


def _shards(cfg: dict) -> dict:
    m = cfg["model"]
    g = torch.Generator().manual_seed(0)
    d, f = m["hidden_size"], m["ffn_hidden_size"]
    return {k: {"w1": torch.randn(d, 2 * f, generator=g) * 0.1, "w2": torch.randn(f, d, generator=g) * 0.1}
            for k in KEYS}  # fmt: skip


def _grads(actor: ExpertActor, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: tuple(torch.randn(w.shape, generator=g) for w in (p1, p2)) for k, (p1, p2) in actor._params.items()}


def _step(actor: ExpertActor, seed: int, step: int) -> None:
    actor.set_grads(_grads(actor, seed))
    actor.apply(0.5, 1e-2, step)


def _save(actor: ExpertActor, root: Path, step: int, cfg: dict) -> Path:
    d = ckpt.new_step_dir(root, step)
    rec = ckpt.FileRecord.from_dict(actor.save(str(d), KEYS))
    dense = ckpt.write_tensor_file(d / ckpt.DENSE_FILE, {"unused": torch.zeros(1)}, kind="dense")  # a manifest needs one
    placement = Placement.contiguous(cfg["model"]["num_layers"], cfg["model"]["num_experts"], 1)
    ckpt.commit(d, ckpt.Manifest(step=step, config=cfg, placement=placement.to_dict(), files=[dense, rec]))
    return d


def _assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert set(a[k]) == set(b[k]) and {"w1.exp_avg", "w2.exp_avg_sq", "w1.step"} <= set(a[k])
        for n in a[k]:
            assert a[k][n].device.type == "cpu" and b[k][n].device.type == "cpu"  # Ray / checkpoints see host
            assert torch.equal(a[k][n], b[k][n]), (k, n)


@pytest.mark.parametrize(("first", "second"), [
    pytest.param("cpu", "cpu", id="cpu-cpu"),
    pytest.param("cuda", "cpu", id="cuda-cpu-cuda", marks=GPU),
    pytest.param("cpu", "cuda", id="cpu-cuda-cpu", marks=GPU),
])  # fmt: skip
def test_checkpoint_moves_between_devices(tmp_path, first, second):
    cfg = _config()
    a = ExpertActor(cfg, 0, "tok", device=first)
    b = ExpertActor(cfg, 1, "tok", device=second)
    c = ExpertActor(cfg, 2, "tok", device=first)
    try:
        a.load_shards(_shards(cfg), 0)
        assert all(p.device.type == first for ps in a._params.values() for p in ps)
        _step(a, 1, 0)
        _step(a, 2, 1)
        d1 = _save(a, tmp_path / "a", 2, cfg)
        b.load_checkpoint(str(d1), KEYS, 1)
        assert all(p.device.type == second for ps in b._params.values() for p in ps)
        _assert_same_state(a.state(), b.state())
        # one more identical step on both: the AdamW state really was carried over
        _step(a, 3, 2)
        _step(b, 3, 2)
        sa, sb = a.state(), b.state()
        for k in KEYS:
            for n in sa[k]:
                assert_close(sb[k][n], sa[k][n], rtol=1e-5, atol=1e-7)
        d2 = _save(b, tmp_path / "b", 3, cfg)  # ... and back onto the first device
        c.load_checkpoint(str(d2), KEYS, 2)
        assert all(p.device.type == first for ps in c._params.values() for p in ps)
        _assert_same_state(b.state(), c.state())
    finally:
        for x in (a, b, c):
            x.shutdown()


def test_bf16_precision_refused_on_cpu():
    with pytest.raises(ValueError, match=r"train.precision = 'bf16' on the CPU: expected 'fp32'"):
        ExpertActor(_config("bf16"), 0, "tok", device="cpu")
