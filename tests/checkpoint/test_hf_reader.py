"""HFCheckpoint: every layout found, everything validated before a weight is read (errors name the file and the
tensor), per-request reads in this model's orientation and the compute dtype."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moe_runtime.checkpoint.hf_config import CheckpointError
from moe_runtime.checkpoint.hf_layout import dense_rules
from moe_runtime.checkpoint.hf_reader import HFCheckpoint
from tests.checkpoint.official import hf_config, official_tensors, write_checkpoint

SHARD2 = {"safetensors": "model-00002-of-00003.safetensors", "bin": "pytorch_model-00002-of-00003.bin"}
INDEX = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}


def _write(tmp_path: Path, fmt: str = "safetensors", shards: int = 3, dtype=torch.bfloat16, **cfg_changes):
    cfg = hf_config(**cfg_changes)
    weights = official_tensors(cfg, seed=0, dtype=dtype)
    return write_checkpoint(tmp_path / "ck", cfg, weights, fmt, shards), weights


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_missing_shard_names_the_file_and_the_index(tmp_path: Path, fmt: str) -> None:
    d, _ = _write(tmp_path, fmt)
    (d / SHARD2[fmt]).unlink()
    with pytest.raises(CheckpointError) as e:
        HFCheckpoint(d)
    msg = str(e.value)
    assert f"missing shard file {SHARD2[fmt]} (listed in {INDEX[fmt]}" in msg and "model.layers." in msg


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_wrong_shape_names_the_tensor_the_file_and_both_shapes(tmp_path: Path, fmt: str) -> None:
    cfg = hf_config()
    weights = official_tensors(cfg, seed=0)
    weights["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(127, 64)
    d = write_checkpoint(tmp_path / "ck", cfg, weights, fmt, shards=1)
    single = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    with pytest.raises(CheckpointError, match=rf"tensor model.layers.1.self_attn.q_proj.weight in {single} has "
                                              r"shape \[127, 64\], expected \[128, 64\]"):
        HFCheckpoint(d)


def test_missing_tensor_names_the_tensor_and_the_index(tmp_path: Path) -> None:
    cfg = hf_config()
    weights = official_tensors(cfg, seed=0)
    del weights["model.layers.1.mlp.experts.3.w2.weight"]
    d = write_checkpoint(tmp_path / "ck", cfg, weights, shards=2)
    with pytest.raises(CheckpointError, match=r"missing tensor model.layers.1.mlp.experts.3.w2.weight "
                                              r"\(not in model.safetensors.index.json\)"):
        HFCheckpoint(d)
    d1 = write_checkpoint(tmp_path / "one", cfg, weights, shards=1)
    with pytest.raises(CheckpointError, match=r"experts.3.w2.weight \(not in model.safetensors\)"):
        HFCheckpoint(d1)


def test_index_pointing_at_the_wrong_file(tmp_path: Path) -> None:
    d, _ = _write(tmp_path)
    index = json.loads((d / INDEX["safetensors"]).read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
    (d / INDEX["safetensors"]).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"puts tensor model.norm.weight in model-00001-of-00003.safetensors, "
                                              r"but model-00001-of-00003.safetensors does not contain it"):
        HFCheckpoint(d)


def test_all_problems_are_reported_together_before_anything_is_read(tmp_path: Path) -> None:
    cfg = hf_config()
    weights = official_tensors(cfg, seed=0)
    weights["model.norm.weight"] = torch.ones(63)
    del weights["model.layers.0.mlp.gate.key.weight"]
    weights["model.layers.0.mlp.extra.weight"] = torch.ones(2)
    d = write_checkpoint(tmp_path / "ck", cfg, weights, shards=3)
    with pytest.raises(CheckpointError) as e:
        HFCheckpoint(d)
    msg = str(e.value)
    assert "(3 problem(s))" in msg
    assert "missing tensor model.layers.0.mlp.gate.key.weight" in msg
    assert "tensor model.norm.weight in model-00003-of-00003.safetensors has shape [63]" in msg
    assert "unexpected tensor model.layers.0.mlp.extra.weight" in msg


def test_unexpected_tensors_are_listed_when_not_strict(tmp_path: Path) -> None:
    cfg = hf_config()
    weights = official_tensors(cfg, seed=0, lm_head=True)
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)  # an old HF save's buffer: not used
    weights["model.layers.2.input_layernorm.weight"] = torch.ones(64)  # a layer config.json does not have
    d = write_checkpoint(tmp_path / "ck", cfg, weights)
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.2.input_layernorm.weight"):
        HFCheckpoint(d)
    ckpt = HFCheckpoint(d, strict=False)
    assert ckpt.summary.unexpected_tensors == ("model.layers.2.input_layernorm.weight",)
    assert ckpt.summary.ignored_tensors == ("lm_head.weight", "model.layers.0.self_attn.rotary_emb.inv_freq")
    assert "unexpected (not loaded): model.layers.2.input_layernorm.weight" in ckpt.summary.describe()


@pytest.mark.parametrize("change,match", [
    (dict(use_shareqk=True), "use_shareqk = True: only false is supported"),
    (dict(moe_config={"gated_linear_unit": False}), "moe_config.gated_linear_unit = False: only true is supported"),
    (dict(hidden_act="gelu"), "hidden_act = 'gelu': only 'silu' is supported"),
])
def test_unsupported_config_fails_naming_the_file_and_the_key(tmp_path: Path, change, match) -> None:
    d, _ = _write(tmp_path, **change)
    with pytest.raises(CheckpointError, match=rf"{d}/config.json: {match}"):
        HFCheckpoint(d)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a directory"):
        HFCheckpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        HFCheckpoint(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(hf_config()))
    with pytest.raises(CheckpointError, match="no weights found"):
        HFCheckpoint(tmp_path / "empty")


def test_truncated_safetensors_file(tmp_path: Path) -> None:
    d, _ = _write(tmp_path, shards=1)
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.norm.weight needs bytes .*truncated"):
        HFCheckpoint(d)


def test_legacy_bin_is_refused_with_its_name(tmp_path: Path) -> None:
    cfg = hf_config()
    d = tmp_path / "ck"
    write_checkpoint(d, cfg, official_tensors(cfg, seed=0), "bin", shards=1)
    torch.save(torch.load(d / "pytorch_model.bin"), d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: cannot be opened as a torch zip checkpoint"):
        HFCheckpoint(d)


def test_index_less_shards_are_mapped_from_their_headers(tmp_path: Path) -> None:
    d, weights = _write(tmp_path, shards=3)
    (d / INDEX["safetensors"]).unlink()
    ckpt = HFCheckpoint(d)
    assert ckpt.summary.index is None and len(ckpt.summary.files) == 3
    # the same tensor in two files is ambiguous without an index
    (d / "extra.safetensors").write_bytes((d / "model-00003-of-00003.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"tensor model.norm.weight is in both"):
        HFCheckpoint(d)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_reads_are_the_stored_tensors_converted(tmp_path: Path, fmt: str) -> None:
    d, weights = _write(tmp_path, fmt, shards=3, dtype=torch.bfloat16)
    raw = HFCheckpoint(d, dtype=torch.bfloat16)
    got = raw.read_hf(weights)
    assert all(torch.equal(got[n], t) and got[n].dtype == torch.bfloat16 for n, t in weights.items())
    if fmt == "safetensors":  # the header parse and offsets agree with the library's own reader
        for fname, _ in raw.summary.files:
            with safe_open(str(d / fname), framework="pt") as f:
                for n in f.keys():
                    assert torch.equal(f.get_tensor(n), got[n])

    ckpt = HFCheckpoint(d)  # fp32 compute dtype: bf16 widens exactly
    w1, w2 = ckpt.read_expert(1, 2)
    assert w1.dtype == torch.float32 and w1.shape == (64, 64) and w2.shape == (32, 64)
    assert torch.equal(w1, weights["model.layers.1.mlp.experts.2.w1.weight"].float().T)
    assert torch.equal(w2, weights["model.layers.1.mlp.experts.2.w2.weight"].float().T)
    pairs = [(1, 0), (0, 3)]
    assert [p for p, _, _ in ckpt.iter_experts(pairs)] == [(0, 3), (1, 0)]  # in file order
    assert ckpt.expert_nbytes(pairs) == 2 * (64 * 64 + 32 * 64) * 2

    dense = dict(ckpt.iter_dense())
    assert list(dense) == [r.param for r in dense_rules(ckpt.config)]
    qk = dense["layers.0.attn.qk_proj.weight"]
    assert torch.equal(qk, torch.cat([weights["model.layers.0.self_attn.q_proj.weight"],
                                      weights["model.layers.0.self_attn.k_proj.weight"]]).float())
    assert dense["layers.0.attn.lfa.conv1.weight"].shape == (32, 64, 2)
    assert list(ckpt.read_dense("final_norm.weight")) == ["final_norm.weight"]
    with pytest.raises(KeyError, match="not a dense tensor"):
        ckpt.read_dense("layers.0.moe.dispatcher.experts.w1")
    experts = [(layer, e) for layer in range(2) for e in range(4)]
    assert ckpt.dense_nbytes() + ckpt.expert_nbytes(experts) == ckpt.summary.tensor_bytes
    assert ckpt.largest_tensor_nbytes == 128 * 64 * 2  # q_proj, k_proj, v_proj, o_proj


def _rss_file_bytes() -> int:
    """Resident file-backed pages of this process (mapped shards count here, heap allocations do not)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux /proc/self/status")
def test_a_mapped_bin_shard_does_not_keep_what_was_read(tmp_path: Path) -> None:
    # 16 experts of 6 MiB each on disk in one .bin shard, which stays mapped while iter_experts reads them: the
    # pages of each tensor are given back once it is copied, so the mapping never holds what was already read
    cfg = hf_config(hidden_size=256, attention_projection_size=512, vocab_size=128, num_hidden_layers=1,
                    eod_token=1, sep_token=1, pad_token_id=1,
                    moe_config={"moe_num_experts": 16, "ffn_hidden_size": 4096})
    tensors = official_tensors(cfg, seed=0, dtype=torch.bfloat16)
    d = write_checkpoint(tmp_path / "ck", cfg, tensors, "bin", shards=1)
    del tensors
    ckpt = HFCheckpoint(d)
    one_expert_on_disk = 3 * 256 * 4096 * 2
    base = _rss_file_bytes()
    peak = base
    for _, w1, w2 in ckpt.iter_experts([(0, e) for e in range(16)]):
        peak = max(peak, _rss_file_bytes())
        del w1, w2
    assert peak - base < 2 * one_expert_on_disk  # without giving pages back: 16 x 6 MiB


def test_a_converter_style_bin_of_views_into_shared_storages(tmp_path: Path) -> None:
    # tools/convert_hf_moe.py saves q_proj/k_proj as the two halves of Megatron's fused matrix, each expert's w1/w2
    # as a transposed slice of the layer's stacked expert weights, and the tied head as the embedding itself
    cfg = hf_config()
    weights = official_tensors(cfg, seed=0, dtype=torch.bfloat16)
    views: dict[str, torch.Tensor] = {}
    for layer in range(2):
        p = f"model.layers.{layer}."
        fused = torch.cat([weights[p + "self_attn.q_proj.weight"], weights[p + "self_attn.k_proj.weight"]])
        views[p + "self_attn.q_proj.weight"], views[p + "self_attn.k_proj.weight"] = fused.split(128)
        stack1 = torch.stack([weights[p + f"mlp.experts.{e}.w1.weight"].T for e in range(4)])  # [E, d, 2f]
        stack2 = torch.stack([weights[p + f"mlp.experts.{e}.w2.weight"].T for e in range(4)])  # [E, f, d]
        for e in range(4):
            views[p + f"mlp.experts.{e}.w1.weight"] = stack1[e].T
            views[p + f"mlp.experts.{e}.w2.weight"] = stack2[e].T
    saved = {n: views.get(n, t) for n, t in weights.items()} | {"lm_head.weight": weights["model.embed_tokens.weight"]}
    assert not saved["model.layers.0.mlp.experts.1.w1.weight"].is_contiguous()
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    torch.save(saved, d / "pytorch_model.bin")
    got = HFCheckpoint(d, dtype=torch.bfloat16).read_hf(weights)
    assert all(torch.equal(got[n], t) for n, t in weights.items())


def test_per_rank_converter_files_get_a_hint(tmp_path: Path) -> None:
    cfg = hf_config()
    weights = official_tensors(cfg, seed=0)
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    for rank in range(2):  # every rank numbers its layers from 0
        torch.save(weights, d / f"pytorch_model_{rank}.bin")
    with pytest.raises(CheckpointError, match=r"is in both pytorch_model_0.bin and pytorch_model_1.bin \(per-pipeline"
                                              r"-rank files of the official converter: merge them with its "
                                              r"tools/concat.py first\)"):
        HFCheckpoint(d)


def test_a_validated_checkpoint_travels_by_pickle(tmp_path: Path) -> None:
    d, weights = _write(tmp_path, "bin", shards=2)
    ckpt = HFCheckpoint(d)
    it = ckpt.iter_experts([(0, 0), (1, 3)])
    next(it)  # a shard is mapped now; the pickle carries none of it
    copy = pickle.loads(pickle.dumps(ckpt))
    assert copy._open_bin is None and copy.config == ckpt.config
    w1, _ = copy.read_expert(1, 3)
    assert torch.equal(w1, weights["model.layers.1.mlp.experts.3.w1.weight"].float().T)
    assert len(pickle.dumps(ckpt)) < 20_000
