"""Damaged own checkpoints (checkpoint/training_state.py): a corrupt newest save falls back to the previous good
one; a truncated or garbage manifest is a CheckpointError naming the file, never a raw decode error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_runtime.checkpoint import training_state as ckpt


def _save(root: Path, step: int, value: float) -> Path:
    d = ckpt.new_step_dir(root, step)
    recs = [ckpt.write_tensor_file(d / ckpt.DENSE_FILE, {"model.w": torch.full((4,), value)}, kind="dense"),
            ckpt.write_expert_file(d / "experts-a0.safetensors", {(0, 0): {"w1": torch.full((2, 2), value),
                                                                          "w2": torch.full((2, 2), value)}})]
    ckpt.commit(d, ckpt.Manifest(step=step, config={}, placement={}, files=recs))
    return d


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_good_one(tmp_path: Path) -> None:
    _save(tmp_path, 2, 2.0)
    newest = _save(tmp_path, 4, 4.0)
    _flip_a_byte(newest / "experts-a0.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.load_manifest(tmp_path, verify=True)  # the newest alone is unusable
    good = ckpt.load_latest_good(tmp_path)
    assert good.manifest.step == 2
    assert len(good.skipped) == 1 and newest.name in good.skipped[0] and "sha256" in good.skipped[0]
    assert torch.equal(ckpt.read_dense(good.manifest)["model.w"], torch.full((4,), 2.0))


def test_every_checkpoint_corrupt_is_an_error_naming_each(tmp_path: Path) -> None:
    a, b = _save(tmp_path, 2, 2.0), _save(tmp_path, 4, 4.0)
    _flip_a_byte(a / ckpt.DENSE_FILE)
    (b / ckpt.MANIFEST).write_text("{")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint verifies") as err:
        ckpt.load_latest_good(tmp_path)
    assert a.name in str(err.value) and b.name in str(err.value)


def test_intact_newest_is_preferred(tmp_path: Path) -> None:
    _save(tmp_path, 2, 2.0)
    _save(tmp_path, 4, 4.0)
    good = ckpt.load_latest_good(tmp_path)
    assert good.manifest.step == 4 and good.skipped == ()


@pytest.mark.parametrize("damage", [b"", b"{\"format\": 1, \"st", b"\xff\xfe\x00garbage\x81", b"[1, 2]",
                                    b"{\"format\": 1, \"step\": \"x\", \"config\": {}, \"placement\": {}, \"files\": []}",
                                    b"{\"format\": 1}"])
def test_malformed_manifest_is_a_checkpoint_error_naming_the_path(tmp_path: Path, damage: bytes) -> None:
    d = _save(tmp_path, 2, 2.0)
    (d / ckpt.MANIFEST).write_bytes(damage)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_manifest(d)
    assert str(d / ckpt.MANIFEST) in str(err.value)


def test_garbage_latest_pointer_is_a_checkpoint_error_naming_it(tmp_path: Path) -> None:
    _save(tmp_path, 2, 2.0)
    (tmp_path / ckpt.LATEST).write_bytes(b"\xff\xfe\x81")
    with pytest.raises(ckpt.CheckpointError, match=str(tmp_path / ckpt.LATEST)):
        ckpt.load_manifest(tmp_path)
    assert ckpt.load_latest_good(tmp_path).manifest.step == 2  # the directories are still there
