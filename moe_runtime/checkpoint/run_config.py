"""The RuntimeConfig of a run that starts from an HF checkpoint (`model.checkpoint`, or `--checkpoint DIR`).

The model's architecture comes from the checkpoint's config.json; the config file's `model:` section keeps only the
run's own choices (rope, max_seq_len, rope_base, init_std, aux_loss_coeff). An architecture key written in the file
that contradicts the checkpoint is an error naming both values (`merge_model_config`). A `preset` in the file is
the file's default model, which the checkpoint replaces: it is dropped, not compared (so the default
cluster/local.yaml, `preset: tiny`, works with any checkpoint); keys written explicitly are compared.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from moe_runtime.checkpoint.hf_config import (
    ARCHITECTURE_FIELDS,
    CheckpointError,
    merge_model_config,
    parse_hf_config,
)
from moe_runtime.config import ConfigError, ModelConfig, RuntimeConfig, load_config, parse_config

CONFIG_FILE = "config.json"


def checkpoint_model_config(directory: str | Path, own: Mapping[str, Any] | None = None) -> Any:
    """The ModelConfig of a checkpoint directory (its config.json only; the weights are validated by HFCheckpoint)."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: model.checkpoint is not a directory")
    if not path.exists():
        raise CheckpointError(f"{path}: missing (an HF checkpoint directory has a config.json)")
    try:
        hf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot be read as JSON: {err}") from None
    return parse_hf_config(hf, str(path), checkpoint=str(Path(directory).resolve()), **dict(own or {})).model


def run_overrides(model: ModelConfig) -> dict[str, Any]:
    """The run's own ModelConfig fields (what a checkpoint does not fix), for HFCheckpoint(...) / load_model."""
    return {k: getattr(model, k) for k in ModelConfig.model_fields
            if k not in ARCHITECTURE_FIELDS and k not in ("preset", "checkpoint")}


def _raw(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        with open(path) as f:  # named stream: the error says `in "<path>", line N`
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if isinstance(data, dict) and "moe_runtime" in data:
        data = data["moe_runtime"]
    return dict(data or {}) if isinstance(data, dict) else {}


def resolve_checkpoint(data: Mapping[str, Any], source: str, checkpoint: str | Path | None = None) -> RuntimeConfig:
    """A config dict (sections) -> RuntimeConfig; with a checkpoint (the argument, else data's model.checkpoint),
    the model is the checkpoint's, merged with the file's run-own model keys."""
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dict(data).items()}
    model = data.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"{source}: model must be a mapping")
    directory = checkpoint if checkpoint is not None else model.get("checkpoint")
    if directory is None:
        return parse_config(data, source)
    directory = str(Path(directory).expanduser().resolve())
    user = {k: v for k, v in model.items() if k not in ("preset", "checkpoint")}
    ckpt_cfg = checkpoint_model_config(directory)
    merged = merge_model_config(ckpt_cfg, user, source, str(Path(directory) / CONFIG_FILE))
    data["model"] = merged.model_dump(mode="json")
    return parse_config(data, source)


def load_run_config(path: str | Path, checkpoint: str | Path | None = None) -> RuntimeConfig:
    """load_config, plus the checkpoint's model when the file names one (model.checkpoint) or `checkpoint` is given.
    Raises ConfigError or CheckpointError (both ValueError) naming the file, the key and the values."""
    path = Path(path)
    if checkpoint is None and "checkpoint" not in (_raw(path).get("model") or {}):
        return load_config(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    return resolve_checkpoint(_raw(path), str(path), checkpoint)


__all__ = ["checkpoint_model_config", "load_run_config", "resolve_checkpoint", "run_overrides"]
