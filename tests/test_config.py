"""Config: presets, YAML loading and exact error messages for bad configs."""

from pathlib import Path

import pytest

from moe_runtime.config import ConfigError, ModelConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_presets():
    m = ModelConfig(preset="yuan-m32")
    assert (m.hidden_size, m.num_layers, m.num_experts, m.top_k, m.ffn_hidden_size, m.vocab_size) == (
        2048, 24, 32, 2, 8192, 135040)
    assert (m.num_heads, m.head_dim, m.rotary_dim, m.aux_loss_coeff, m.router) == (16, 256, 128, 0.0, "attention")
    assert ModelConfig(preset="tiny", router="linear").router == "linear"


def test_local_yaml_loads():
    cfg = load_config(ROOT / "cluster/local.yaml")
    assert cfg.model.router == "attention" and cfg.model.hidden_size == 64


BAD = [
    ({"model": {"preset": "tiny", "top_k": 9}}, "model.top_k = 9: must be <= num_experts (8)"),
    ({"model": {"preset": "huge"}}, "model.preset = 'huge': expected one of ['small', 'tiny', 'yuan-m32']"),
    ({"model": {"preset": "tiny", "hidden": 3}}, "model.hidden = 3: unknown key"),
    ({"train": {"lr": -1}}, "train.lr = -1: Input should be greater than 0"),
    ({"train": {"seq_len": 512}}, "train.seq_len = 512: must be <= model.max_seq_len (128)"),
    ({"cluster": {"expert_actors": 6, "num_gpus": 4}}, "cluster.expert_actors = 6: needs 6 GPUs but num_gpus = 4"),
    ({"train": {"batch_size": 5}}, "train.batch_size = 5: must be a multiple of cluster.router_workers (2)"),
    ({"model": {"preset": "tiny", "rotary_dim": 7}}, "model.rotary_dim = 7: must be even and <= head_dim (32)"),
    ({"trian": {}}, "trian = {}: unknown key"),
    ({"model": {"vocab_size": 10}}, "model.hidden_size: required field is missing"),
]


@pytest.mark.parametrize("data, message", BAD)
def test_bad_configs_name_field_value_and_expectation(data, message):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in str(err.value), str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
