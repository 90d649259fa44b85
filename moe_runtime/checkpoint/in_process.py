"""An in-process model from an HF checkpoint and back, tensor by tensor (the single-process path and the oracle)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from moe_runtime.checkpoint.hf_config import ARCHITECTURE_FIELDS, CheckpointError, SpecialTokens
from moe_runtime.checkpoint.hf_layout import all_rules, dense_rules
from moe_runtime.checkpoint.hf_reader import HFCheckpoint
from moe_runtime.checkpoint.hf_writer import DEFAULT_MAX_SHARD_BYTES, HFCheckpointWriter
from moe_runtime.config import ModelConfig
from moe_runtime.model.transformer import DispatcherFactory, MoETransformer, build_model, expert_param_name

Progress = Callable[[str, int], None]  # (name just loaded, its bytes)


def check_same_architecture(model_cfg: ModelConfig, checkpoint_cfg: ModelConfig, source: str) -> None:
    for key in ARCHITECTURE_FIELDS:
        if getattr(model_cfg, key) != getattr(checkpoint_cfg, key):
            raise CheckpointError(f"model.{key} = {getattr(model_cfg, key)!r} but the checkpoint ({source}) has "
                                  f"{getattr(checkpoint_cfg, key)!r}")


@torch.no_grad()
def load_state(model: MoETransformer, ckpt: HFCheckpoint, progress: Progress | None = None) -> int:
    """Copy the checkpoint into `model` in place, one tensor at a time: every dense tensor, and the experts of the
    layers whose stacked expert weights live in this model (none with remote experts). Returns the bytes read."""
    check_same_architecture(model.cfg, ckpt.config, str(ckpt.directory))
    params = dict(model.named_parameters())
    covered = set()
    done = 0
    rules = dense_rules(ckpt.config)
    missing = [r for r in rules if r.param not in params]
    if missing:
        raise CheckpointError(f"model has no parameter {missing[0].param} (checkpoint tensor "
                              f"{missing[0].hf_names[0]})")
    for rule, (param, tensor) in zip(rules, ckpt.iter_dense()):
        params[param].copy_(tensor)
        covered.add(param)
        done += _tick(progress, param, ckpt.hf_nbytes(rule.hf_names))
    layers = [layer for layer in range(ckpt.config.num_layers) if expert_param_name(layer, "w1") in params]
    pairs = [(layer, expert) for layer in layers for expert in range(ckpt.config.num_experts)]
    for (layer, expert), w1, w2 in ckpt.iter_experts(pairs):
        w1_key, w2_key = expert_param_name(layer, "w1"), expert_param_name(layer, "w2")
        params[w1_key][expert].copy_(w1)
        params[w2_key][expert].copy_(w2)
        covered |= {w1_key, w2_key}
        done += _tick(progress, f"{w1_key}[{expert}]", ckpt.expert_nbytes([(layer, expert)]))
    left = sorted(set(params) - covered)
    if left:
        raise CheckpointError(f"model parameter {left[0]} has no tensor in the HF layout ({len(left)} such)")
    return done


def _tick(progress: Progress | None, name: str, nbytes: int) -> int:
    if progress is not None:
        progress(name, nbytes)
    return nbytes


def load_model(checkpoint: str | Path | HFCheckpoint, *, seed: int = 0,
               dispatcher_factory: DispatcherFactory | None = None, dtype: torch.dtype = torch.float32,
               progress: Progress | None = None, **overrides: Any) -> MoETransformer:
    """build_model(the checkpoint's config) with the checkpoint's weights. `overrides`: the run's own ModelConfig
    fields (e.g. rope='hf') for a checkpoint given by its directory (an opened HFCheckpoint has its config)."""
    if isinstance(checkpoint, HFCheckpoint):
        if overrides:
            raise TypeError(f"load_model: {sorted(overrides)} given with an opened HFCheckpoint: pass them to "
                            "HFCheckpoint(...)")
        ckpt = checkpoint
    else:
        ckpt = HFCheckpoint(checkpoint, dtype=dtype, **overrides)
    with no_random_init():  # every parameter is then overwritten (load_state fails on any it does not cover)
        model = build_model(ckpt.config, seed, dispatcher_factory)
    load_state(model, ckpt, progress)
    return model


class _SkipRandomInit(TorchFunctionMode):
    """torch.nn.init's random fillers return their tensor untouched, in this thread only (a torch function mode is
    thread-local: another thread building a model meanwhile still gets its random weights)."""

    _SKIPPED = frozenset((torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


@contextmanager
def no_random_init() -> Iterator[None]:
    """Parameters allocated but not drawn (torch.nn.init's random fillers skipped): drawing the random weights of
    a real-width model only to overwrite them costs minutes here (3.2G expert values at ~30 ns each for 2 layers
    of 32 experts) and touches every page once more. Buffers (e.g. rotary tables) are computed, not drawn: kept;
    zeros_/ones_ still fill (cheap). Only this thread is affected (`_SkipRandomInit`)."""
    with _SkipRandomInit():
        yield


def model_hf_tensors(model: MoETransformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor view) for the whole in-process model in checkpoint order; experts one slice at a time."""
    params = dict(model.named_parameters())
    for rule in all_rules(model.cfg):
        if rule.param not in params:
            raise CheckpointError(f"model has no parameter {rule.param}: export needs every tensor in this process")
        value = params[rule.param].detach()
        yield from zip(rule.hf_names, rule.to_hf(value if rule.expert is None else value[rule.expert]))


def save_model(model: MoETransformer, directory: str | Path, *, dtype: torch.dtype = torch.bfloat16,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, base_config: Mapping[str, Any] | None = None,
               tokens: SpecialTokens | None = None) -> Path:
    """Export an in-process model in the HF layout (see hf_writer)."""
    with HFCheckpointWriter(directory, model.cfg, dtype=dtype, max_shard_bytes=max_shard_bytes,
                            base_config=base_config, tokens=tokens) as writer:
        writer.write_all(model_hf_tensors(model))
    return Path(directory)
