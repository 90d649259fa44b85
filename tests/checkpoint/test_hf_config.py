"""config.json <-> ModelConfig: the official keys, derived head and rotary widths, errors that name the key and the
value, export and re-import, and a run's config file against the checkpoint's."""

from __future__ import annotations

import pytest

from moe_runtime.checkpoint.hf_config import (
    CheckpointError,
    SpecialTokens,
    hf_config_from_model,
    merge_model_config,
    model_config_from_hf,
    parse_hf_config,
)
from moe_runtime.config import PRESETS, ModelConfig
from tests.checkpoint.official import hf_config

M32 = hf_config(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, attention_projection_size=4096,
                vocab_size=135040, max_position_embeddings=4096, eod_token=77185, sep_token=77187,
                pad_token_id=77185,
                moe_config={"moe_num_experts": 32, "moe_top_k": 2, "ffn_hidden_size": 8192})


def test_official_keys_map_onto_the_model() -> None:
    info = parse_hf_config(hf_config())
    m = info.model
    assert (m.hidden_size, m.num_layers, m.num_heads, m.head_dim, m.rotary_dim) == (64, 2, 2, 64, 32)
    assert (m.vocab_size, m.num_experts, m.top_k, m.ffn_hidden_size, m.max_seq_len) == (80, 4, 2, 32, 64)
    assert m.lfa and m.router == "attention" and m.rope == "exact" and m.rope_base == 10000.0
    assert m.norm_eps == 1e-6 and m.init_std == 0.02 and m.aux_loss_coeff == 0.0
    assert info.tokens == SpecialTokens(eod=77, sep=78, pad=79)
    assert info.reset_attention_mask and info.reset_position_ids
    assert info.ignored_keys == ("architectures", "auto_map", "bos_token_id", "eos_token_id", "model_type",
                                 "torch_dtype", "use_cache")


def test_the_released_geometry_is_the_m32_preset() -> None:
    m = model_config_from_hf(M32)
    preset = ModelConfig.from_preset("yuan-m32")
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "rotary_dim", "rope_base",
                "num_experts", "top_k", "ffn_hidden_size", "router", "norm_eps", "max_seq_len", "lfa"):
        assert getattr(m, key) == getattr(preset, key), key


def test_rotary_width_follows_the_hf_class() -> None:
    # head_dim == hidden / heads: the whole head rotates; attention_projection_size absent means hidden / heads
    cfg = hf_config()
    del cfg["attention_projection_size"]
    m = model_config_from_hf(cfg)
    assert (m.head_dim, m.rotary_dim) == (32, 32)
    m = model_config_from_hf(hf_config(attention_projection_size=256))
    assert (m.head_dim, m.rotary_dim) == (128, 32)


def _without(key: str) -> dict:
    cfg = hf_config()
    if key.startswith("moe_config."):
        del cfg["moe_config"][key.split(".")[1]]
    else:
        del cfg[key]
    return cfg


@pytest.mark.parametrize("cfg,match", [
    (hf_config(use_shareqk=True), r"use_shareqk = True: only false is supported \(true selects the shared-QK"),
    (hf_config(moe_config={"gated_linear_unit": False}), r"moe_config.gated_linear_unit = False: only true"),
    (hf_config(moe_config={"norm_topk_prob": False}), r"moe_config.norm_topk_prob = False: only true"),
    (hf_config(hidden_act="gelu"), r"hidden_act = 'gelu': only 'silu' is supported"),
    (hf_config(tie_word_embeddings=False), r"tie_word_embeddings = False: only true is supported"),
    (hf_config(causal_mask=False), r"causal_mask = False: only true"),
    (hf_config(rms_norm_eps=1e-5), r"rms_norm_eps = 1e-05: only 1e-06 is supported"),
    (hf_config(attention_projection_size=129), r"attention_projection_size = 129: expected a positive multiple of "
                                               r"num_attention_heads \(2\)"),
    (hf_config(attention_projection_size=30), r"attention_projection_size = 30: the HF rotary embedding turns "
                                              r"hidden_size // heads = 32 channels"),
    (hf_config(moe_config={"moe_top_k": 5}), r"moe_config.moe_top_k = 5: must be <= moe_config.moe_num_experts"),
    (hf_config(moe_config={"moe_num_experts": 0}), r"moe_config.moe_num_experts = 0: expected a positive integer"),
    (hf_config(hidden_size="64"), r"hidden_size = '64': expected a positive integer"),
    (hf_config(eod_token=80), r"eod_token = 80: must be < vocab_size \(80\)"),
    (hf_config() | {"moe_config": None}, r"moe_config = None: expected an object"),
    (_without("hidden_size"), r"required key hidden_size is missing"),
    (_without("moe_config.gated_linear_unit"), r"required key moe_config.gated_linear_unit is missing"),
])
def test_unsupported_or_malformed_configs_name_the_key_and_value(cfg, match) -> None:
    with pytest.raises(CheckpointError, match=rf"^ck/config.json: {match}"):
        parse_hf_config(cfg, "ck/config.json")


def test_overrides_set_run_fields_only() -> None:
    m = model_config_from_hf(hf_config(), rope="hf", max_seq_len=300, rope_base=40890.0)
    assert (m.rope, m.max_seq_len, m.rope_base) == ("hf", 300, 40890.0)
    with pytest.raises(CheckpointError, match="hidden_size is fixed by the checkpoint"):
        model_config_from_hf(hf_config(), hidden_size=128)


def test_export_and_reimport() -> None:
    original = hf_config()
    info = parse_hf_config(original)
    out = hf_config_from_model(info.model, base=info.raw)
    assert out == original  # every key this runtime does not own comes back unchanged
    assert parse_hf_config(out).model == info.model

    # a model trained here: no base config; its tokens are given, and it has no document reset
    model = info.model.model_copy(update={"rope_base": 40890.0})
    out = hf_config_from_model(model, tokens=SpecialTokens(eod=1, sep=2, pad=3))
    assert (out["eod_token"], out["sep_token"], out["pad_token_id"]) == (1, 2, 3)
    assert out["reset_attention_mask"] is False and out["reset_position_ids"] is False
    assert out["rotary_base"] == 40890.0 and out["architectures"] == ["YuanForCausalLM"]
    assert parse_hf_config(out).model == model
    with pytest.raises(CheckpointError, match="needs eod_token"):
        hf_config_from_model(model)


def test_export_refuses_what_the_hf_classes_cannot_express() -> None:
    tiny = ModelConfig.from_preset("tiny")  # head_dim 32 == hidden / heads but rotary 16: HF would rotate all 32
    with pytest.raises(CheckpointError, match=r"model.rotary_dim = 16: the HF class rotates 32 channels"):
        hf_config_from_model(tiny, tokens=SpecialTokens(0, 0, 0))
    with pytest.raises(CheckpointError, match="LFA attention and the attention router only"):
        hf_config_from_model(ModelConfig.from_preset("tiny", router="linear"), tokens=SpecialTokens(0, 0, 0))


def test_a_run_config_that_contradicts_the_checkpoint_names_both_values() -> None:
    ckpt = model_config_from_hf(hf_config(), checkpoint="ck")
    m = merge_model_config(ckpt, {"checkpoint": "ck", "rope": "hf", "max_seq_len": 32, "hidden_size": 64},
                           "run.yaml", "ck")
    assert (m.rope, m.max_seq_len, m.hidden_size, m.checkpoint) == ("hf", 32, 64, "ck")
    with pytest.raises(CheckpointError, match=r"^run.yaml: model.hidden_size = 128 contradicts hidden_size = 64 of "
                                              r"the checkpoint \(ck/config.json\)"):
        merge_model_config(ckpt, {"hidden_size": 128}, "run.yaml", "ck/config.json")
    with pytest.raises(CheckpointError, match=rf"model.vocab_size = {PRESETS['tiny']['vocab_size']} contradicts"):
        merge_model_config(ckpt, {"preset": "tiny"}, "run.yaml", "ck")
    with pytest.raises(CheckpointError, match="model.heads = 3: unknown key"):
        merge_model_config(ckpt, {"heads": 3}, "run.yaml", "ck")
    with pytest.raises(CheckpointError, match="invalid model settings"):
        merge_model_config(ckpt, {"rope": "fast"}, "run.yaml", "ck")
