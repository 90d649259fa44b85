"""The planned-shard writer: shards under the size limit, readable by the safetensors library and by HFCheckpoint,
tensors accepted one at a time in any order and from several processes, incomplete exports never committed."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_runtime.checkpoint.hf_config import CheckpointError, SpecialTokens, hf_config_from_model, model_config_from_hf
from moe_runtime.checkpoint.hf_layout import expected_hf_shapes
from moe_runtime.checkpoint.hf_reader import HFCheckpoint
from moe_runtime.checkpoint.hf_writer import (
    HFCheckpointWriter,
    copy_side_files,
    create_shard_files,
    finish,
    plan_shards,
    write_planned,
)
from tests.checkpoint.official import hf_config, official_tensors

CFG = model_config_from_hf(hf_config())
TOKENS = SpecialTokens(eod=77, sep=78, pad=79)


def test_plan_respects_the_shard_limit() -> None:
    plan = plan_shards(CFG, torch.bfloat16, max_shard_bytes=40_000)
    assert len(plan.files) > 2 and plan.files[0] == f"model-00001-of-{len(plan.files):05d}.safetensors"
    per_file: dict[str, int] = {}
    for t in plan.tensors.values():
        per_file[t.file] = per_file.get(t.file, 0) + t.nbytes
    assert max(per_file.values()) <= 40_000
    assert list(plan.tensors) == list(expected_hf_shapes(CFG))  # checkpoint order
    assert plan_shards(CFG, torch.bfloat16, 40_000) == plan  # the same plan in every process
    one = plan_shards(CFG, torch.float32)
    assert one.files == ["model.safetensors"] and all(h and len(h) % 8 == 0 for h in one.headers.values())
    tiny_limit = plan_shards(CFG, torch.bfloat16, max_shard_bytes=1)  # one tensor per shard, never an empty one
    assert len(tiny_limit.files) == len(tiny_limit.tensors)
    with pytest.raises(CheckpointError, match="dtype torch.int8"):
        plan_shards(CFG, torch.int8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_written_in_reverse_order_and_read_by_the_library(tmp_path: Path, dtype) -> None:
    weights = official_tensors(hf_config(), seed=1)
    with HFCheckpointWriter(tmp_path / "out", CFG, dtype=dtype, max_shard_bytes=30_000, tokens=TOKENS) as w:
        for name in reversed(list(weights)):
            w.write_hf(name, weights[name])
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    loaded: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index["weight_map"].values())):
        loaded |= load_file(str(tmp_path / "out" / fname))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in loaded.values())
    assert set(loaded) == set(weights)
    assert all(torch.equal(loaded[n], t.to(dtype)) for n, t in weights.items())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.") and config["eod_token"] == 77
    ckpt = HFCheckpoint(tmp_path / "out")
    assert ckpt.config.model_dump(exclude={"checkpoint"}) == CFG.model_dump(exclude={"checkpoint"})


def test_writes_by_this_models_names(tmp_path: Path) -> None:
    weights = official_tensors(hf_config(), seed=2)
    with HFCheckpointWriter(tmp_path / "a", CFG, dtype=torch.float32, tokens=TOKENS) as w:
        w.write_all(weights.items())
    src = HFCheckpoint(tmp_path / "a")
    with HFCheckpointWriter(tmp_path / "b", CFG, dtype=torch.float32, tokens=TOKENS) as w:
        for param, tensor in src.iter_dense():
            w.write_param(param, tensor)
        for layer in range(CFG.num_layers):
            for (_, e), w1, w2 in src.iter_experts((layer, e) for e in range(CFG.num_experts)):
                w.write_expert(layer, e, w1, w2)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_incomplete_or_failed_exports_are_never_committed(tmp_path: Path) -> None:
    weights = official_tensors(hf_config(), seed=3)
    w = HFCheckpointWriter(tmp_path / "out", CFG, tokens=TOKENS)
    names = list(weights)
    for name in names[:-1]:
        w.write_hf(name, weights[name])
    with pytest.raises(CheckpointError, match=rf"export incomplete, 1 tensor\(s\) never written, e.g. {names[-1]}"):
        w.close()
    assert not (tmp_path / "out" / "config.json").exists()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        HFCheckpoint(tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"written twice"):
        w.write_hf(names[0], weights[names[0]])
    with pytest.raises(CheckpointError, match=r"shape \[3\], expected \[64\]"):
        w.write_hf("model.norm.weight", torch.ones(3))
    with pytest.raises(CheckpointError, match="not part of this export's layout"):
        w.write_hf("lm_head.weight", weights["model.embed_tokens.weight"])

    with pytest.raises(RuntimeError, match="actor died"):
        with HFCheckpointWriter(tmp_path / "failed", CFG, tokens=TOKENS):
            raise RuntimeError("actor died")
    assert not (tmp_path / "failed" / "config.json").exists()
    with pytest.raises(CheckpointError, match="already holds"):
        HFCheckpointWriter(tmp_path / "failed", CFG, tokens=TOKENS)


def _write_some(directory: str, names: list[str], seed: int) -> None:
    weights = official_tensors(hf_config(), seed=seed)
    plan = plan_shards(CFG, torch.bfloat16, max_shard_bytes=50_000)  # rebuilt here: plain data, same everywhere
    for name in names:
        write_planned(directory, plan, name, weights[name])


def test_several_processes_write_into_the_same_shards(tmp_path: Path) -> None:
    plan = plan_shards(CFG, torch.bfloat16, max_shard_bytes=50_000)
    create_shard_files(tmp_path / "out", plan)
    names = list(plan.tensors)
    other = multiprocessing.get_context("spawn").Process(target=_write_some,
                                                         args=(str(tmp_path / "out"), names[1::2], 5))
    other.start()
    _write_some(str(tmp_path / "out"), names[0::2], 5)  # this process writes the other half meanwhile
    other.join(120)
    assert other.exitcode == 0
    finish(tmp_path / "out", plan, hf_config_from_model(CFG, tokens=TOKENS))
    weights = official_tensors(hf_config(), seed=5, dtype=torch.bfloat16)
    got = HFCheckpoint(tmp_path / "out", dtype=torch.bfloat16).read_hf(weights)
    assert all(torch.equal(got[n], t) for n, t in weights.items())


def test_side_files_travel_with_an_export(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name, data in (("tokenizer.model", b"sp"), ("tokenizer_config.json", b"{}"), ("yuan_hf_model.py", b"#"),
                       ("config.json", b"{}"), ("model.safetensors", b""), ("pytorch_model.bin.index.json", b"{}")):
        (src / name).write_bytes(data)
    assert copy_side_files(src, tmp_path / "out") == ["tokenizer.model", "tokenizer_config.json", "yuan_hf_model.py"]
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"sp"
