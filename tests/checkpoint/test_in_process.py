"""A checkpoint in the official layout, loaded in process: logits equal the independent float64 transcription of the
official forward (tests/checkpoint/official.py) within 1e-4 relative, in every file layout and both stored dtypes,
with both RoPE modes; export from the loaded model reproduces every stored tensor bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_runtime.checkpoint.hf_reader import HFCheckpoint
from moe_runtime.checkpoint.in_process import load_model, load_state, model_hf_tensors, save_model
from moe_runtime.config import ModelConfig
from moe_runtime.model.transformer import build_model
from tests.checkpoint.official import hf_config, official_forward, official_tensors, rel_err, write_checkpoint

TOL = 1e-4


def _ids(b: int, s: int, seed: int = 1) -> torch.Tensor:
    # no eod (77): the official reset masks change nothing, and this model has none
    return torch.randint(0, 77, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt,shards", [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 3)])
@pytest.mark.parametrize("rope", ["exact", "hf"])
def test_logits_equal_the_official_forward(tmp_path: Path, dtype, fmt, shards, rope) -> None:
    cfg = hf_config()
    weights = official_tensors(cfg, seed=0, dtype=dtype, lm_head=True)
    write_checkpoint(tmp_path / "ck", cfg, weights, fmt, shards)
    ids = _ids(2, 12)
    want, gap = official_forward(cfg, weights, ids, rope)
    assert gap > 1e-5  # the routing is far from a tie, so the comparison tests the math, not luck

    model = load_model(tmp_path / "ck", rope=rope)
    with torch.no_grad():
        got = model(ids).logits
    assert model.cfg.rope == rope and got.dtype == torch.float32
    assert rel_err(got, want) < TOL


def test_rope_modes_differ_and_each_matches_its_reference(tmp_path: Path) -> None:
    # M32-like partial rotary (32 of 64 channels) over 300 positions: past 256, the official bf16 arange of
    # positions rounds them (257 -> 256, ...), which only the hf mode reproduces
    cfg = hf_config()
    weights = official_tensors(cfg, seed=0)
    write_checkpoint(tmp_path / "ck", cfg, weights)
    ids = _ids(1, 300, seed=2)
    got = {}
    for rope in ("exact", "hf"):
        with torch.no_grad():
            got[rope] = load_model(tmp_path / "ck", rope=rope, max_seq_len=300)(ids).logits
    want = {rope: official_forward(cfg, weights, ids, rope)[0] for rope in ("exact", "hf")}
    assert rel_err(got["exact"], want["exact"]) < TOL
    assert rel_err(got["hf"], want["hf"]) < TOL
    assert rel_err(got["hf"], want["exact"]) > 100 * TOL  # the modes are different models


def test_load_state_fills_an_existing_model_and_needs_the_same_architecture(tmp_path: Path) -> None:
    cfg = hf_config()
    write_checkpoint(tmp_path / "ck", cfg, official_tensors(cfg, seed=3, dtype=torch.bfloat16), "safetensors", 2)
    ckpt = HFCheckpoint(tmp_path / "ck")
    model = build_model(ckpt.config, seed=7)
    seen: list[str] = []
    read = load_state(model, ckpt, progress=lambda name, nbytes: seen.append(name))
    assert read == ckpt.summary.tensor_bytes  # every stored byte read once, the unused lm_head none
    assert len(seen) == 1 + 2 * (11 + 4) + 1  # embedding, per layer 11 dense + 4 experts, final norm
    fresh = load_model(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))

    other = build_model(ModelConfig(**{**ckpt.config.model_dump(), "ffn_hidden_size": 64}), seed=0)
    with pytest.raises(ValueError, match=r"model.ffn_hidden_size = 64 but the checkpoint .* has 32"):
        load_state(other, ckpt)


@pytest.mark.parametrize("dtype,fmt", [(torch.bfloat16, "safetensors"), (torch.bfloat16, "bin"),
                                       (torch.float32, "safetensors")])
def test_import_export_import_is_bit_exact(tmp_path: Path, dtype, fmt) -> None:
    cfg = hf_config()
    weights = official_tensors(cfg, seed=4, dtype=dtype)
    write_checkpoint(tmp_path / "a", cfg, weights, fmt, shards=3)
    ckpt = HFCheckpoint(tmp_path / "a")
    model = load_model(ckpt)
    save_model(model, tmp_path / "b", dtype=dtype, max_shard_bytes=20_000, base_config=ckpt.info.raw)

    again = HFCheckpoint(tmp_path / "b", dtype=dtype)  # read back in the stored dtype: no conversion at all
    assert len(again.summary.files) > 1 and again.summary.index == "model.safetensors.index.json"
    back = again.read_hf(weights)
    for name, t in weights.items():
        assert back[name].dtype == dtype and torch.equal(back[name], t), name
    assert again.info.raw == {**ckpt.info.raw, "torch_dtype": str(dtype).removeprefix("torch.")}
    reloaded = load_model(again)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))


def test_model_hf_tensors_walks_the_model_without_copies() -> None:
    cfg = ModelConfig(**{**ModelConfig.from_preset("tiny").model_dump(), "head_dim": 64, "rotary_dim": 32,
                         "preset": None})
    model = build_model(cfg, seed=0)
    w1 = model.layers[1].moe.dispatcher.experts.w1
    items = dict(model_hf_tensors(model))
    assert len(items) == 1 + 2 * (14 + 2 * cfg.num_experts) + 1
    view = items["model.layers.1.mlp.experts.5.w1.weight"]
    assert view.shape == (2 * cfg.ffn_hidden_size, cfg.hidden_size) and view.data_ptr() == w1[5].data_ptr()


def test_skipping_random_init_while_loading_leaves_other_threads_alone():
    """load_model skips drawing weights it overwrites; a model built meanwhile on another thread still gets its
    random weights (the skip is a thread-local torch function mode, not a patch of torch.nn.init)."""
    import threading

    from moe_runtime.checkpoint.in_process import no_random_init

    drawn: dict[str, torch.Tensor] = {}

    def other_thread():
        drawn["other"] = torch.nn.init.normal_(torch.zeros(64))

    with no_random_init():
        drawn["here"] = torch.nn.init.normal_(torch.zeros(64))
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert torch.count_nonzero(drawn["here"]) == 0  # skipped in the loading thread
    assert torch.count_nonzero(drawn["other"]) == 64  # drawn in the other one
    assert torch.count_nonzero(torch.nn.init.normal_(torch.zeros(8))) == 8  # and again here once done
