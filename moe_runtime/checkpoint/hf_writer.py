"""Write the HF Yuan layout: config.json, safetensors shards under a size limit, their index json.

The shards are planned from the config before any tensor arrives (`plan_shards`: every name, shape and offset is
known from the layout), the files are created at their final size with their headers, and each tensor is written
at its own offset when it comes. So tensors can arrive one at a time, in any order, from any process that can
reach the directory (`write_planned`): nothing is gathered, a writer holds one tensor. config.json is written last
(`finish`): a directory without it is an incomplete export, and the reader refuses it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_runtime.checkpoint.hf_config import CheckpointError, SpecialTokens, hf_config_from_model
from moe_runtime.checkpoint.hf_layout import Shape, dense_rules, expected_hf_shapes, expert_rules
from moe_runtime.checkpoint.hf_reader import (
    CONFIG_FILE,
    SAFETENSORS_DTYPES,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
)
from moe_runtime.config import ModelConfig

DEFAULT_MAX_SHARD_BYTES = 4 * 2**30  # the usual HF shard size for large models
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_TORCH_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32",
                      torch.float64: "float64"}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    file: str
    shape: Shape
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class ShardPlan:
    """Where every tensor of an export goes. Plain data: the same (cfg, dtype, limit) gives the same plan anywhere."""

    dtype: torch.dtype
    tensors: Mapping[str, PlannedTensor]
    headers: Mapping[str, bytes]  # file name -> its first bytes (length + JSON header, padded to 8)
    sizes: Mapping[str, int]  # file name -> total size

    @property
    def files(self) -> list[str]:
        return list(self.headers)

    def index(self) -> dict[str, Any]:
        return {"metadata": {"total_size": sum(t.nbytes for t in self.tensors.values())},
                "weight_map": {n: t.file for n, t in self.tensors.items()}}


def plan_shards(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ShardPlan:
    """Tensors in checkpoint order, a new shard whenever the next tensor would pass max_shard_bytes (a tensor larger
    than the limit gets a shard of its own)."""
    if dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"dtype {dtype}: expected one of {sorted(map(str, _DTYPE_NAMES))}")
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes = {max_shard_bytes}: must be positive")
    groups: list[list[tuple[str, Shape, int]]] = [[]]
    used = 0
    for name, shape in expected_hf_shapes(cfg).items():
        nbytes = dtype.itemsize
        for s in shape:
            nbytes *= s
        if groups[-1] and used + nbytes > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append((name, shape, nbytes))
        used += nbytes
    n = len(groups)
    names = [SAFETENSORS_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    tensors: dict[str, PlannedTensor] = {}
    headers: dict[str, bytes] = {}
    sizes: dict[str, int] = {}
    for fname, group in zip(names, groups):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        pos = 0
        for name, shape, nbytes in group:
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)  # data 8-byte aligned; the format allows trailing spaces
        headers[fname] = struct.pack("<Q", len(text)) + text
        start = 8 + len(text)
        for name, shape, nbytes in group:
            begin = header[name]["data_offsets"][0]
            tensors[name] = PlannedTensor(name, fname, shape, start + begin, nbytes)
        sizes[fname] = start + pos
    return ShardPlan(dtype, tensors, headers, sizes)


def create_shard_files(directory: str | Path, plan: ShardPlan) -> None:
    """Create every shard at its final size with its header (the data regions start as zeros)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    taken = [p.name for p in directory.iterdir() if p.name in (CONFIG_FILE, SAFETENSORS_INDEX, *plan.files)
             or p.suffix in (".safetensors", ".bin")]
    if taken:
        raise CheckpointError(f"{directory}: already holds {', '.join(sorted(taken)[:3])}; export into an empty or "
                              "new directory")
    for fname, head in plan.headers.items():
        with (directory / fname).open("wb") as f:
            f.write(head)
            f.truncate(plan.sizes[fname])


def write_planned(directory: str | Path, plan: ShardPlan, name: str, tensor: torch.Tensor) -> int:
    """Write one HF tensor at its planned place (converted to the plan's dtype); returns the bytes written.
    Safe from several processes at once: each tensor has its own byte range of a pre-sized file."""
    entry = plan.tensors.get(name)
    if entry is None:
        raise CheckpointError(f"tensor {name}: not part of this export's layout")
    if tuple(tensor.shape) != entry.shape:
        raise CheckpointError(f"tensor {name}: shape {list(tensor.shape)}, expected {list(entry.shape)}")
    data = tensor.detach().to(device="cpu", dtype=plan.dtype, memory_format=torch.contiguous_format)
    with (Path(directory) / entry.file).open("r+b") as f:
        f.seek(entry.offset)
        if entry.nbytes:
            f.write(data.reshape(-1).view(torch.uint8).numpy())
    return entry.nbytes


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finish(directory: str | Path, plan: ShardPlan, config_json: Mapping[str, Any]) -> None:
    """Index (when there is more than one shard), then config.json: the commit point of an export."""
    directory = Path(directory)
    for fname in plan.files:
        with (directory / fname).open("rb+") as f:
            os.fsync(f.fileno())
    if len(plan.files) > 1:
        _write_json_atomic(directory / SAFETENSORS_INDEX, plan.index())
    _write_json_atomic(directory / CONFIG_FILE, dict(config_json))


def copy_side_files(source: str | Path, directory: str | Path) -> list[str]:
    """Copy what an export of an imported checkpoint should carry along (tokenizer.model, tokenizer and generation
    configs, the remote-code .py files): every plain file of `source` that is not weights, an index or config.json.
    Returns the names copied."""
    source, directory = Path(source), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json") \
                or path.name == CONFIG_FILE:
            continue
        shutil.copyfile(path, directory / path.name)
        copied.append(path.name)
    return copied


def expert_hf_tensors(cfg: ModelConfig, layer: int, expert: int, w1_d2f: torch.Tensor,
                      w2_fd: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One expert in this model's orientation -> its HF (name, tensor) pairs (transposed views)."""
    r1, r2 = expert_rules(cfg, layer, expert)
    return [(r1.hf_names[0], r1.to_hf(w1_d2f)[0]), (r2.hf_names[0], r2.to_hf(w2_fd)[0])]


def dense_hf_tensors(cfg: ModelConfig, param: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One dense tensor by this model's state-dict key -> its HF (name, tensor) pairs."""
    rule = next((r for r in dense_rules(cfg) if r.param == param), None)
    if rule is None:
        raise CheckpointError(f"{param}: not a dense tensor of the HF layout")
    return list(zip(rule.hf_names, rule.to_hf(tensor)))


class HFCheckpointWriter:
    """One-process export: create the shards, take tensors one at a time (HF names, or this model's), then close()
    checks that every tensor came and writes the index and config.json. Leaving a `with` block by an exception
    writes no config.json, so the partial directory is never mistaken for a checkpoint."""

    def __init__(self, directory: str | Path, cfg: ModelConfig, *, dtype: torch.dtype = torch.bfloat16,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, base_config: Mapping[str, Any] | None = None,
                 tokens: SpecialTokens | None = None):
        self.directory, self.cfg = Path(directory), cfg
        self.plan = plan_shards(cfg, dtype, max_shard_bytes)
        self.config_json = hf_config_from_model(cfg, base_config, tokens, torch_dtype=_TORCH_DTYPE_NAMES[dtype])
        create_shard_files(self.directory, self.plan)
        self.written: set[str] = set()
        self.bytes_written = 0

    def write_hf(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.written:
            raise CheckpointError(f"tensor {name}: written twice")
        self.bytes_written += write_planned(self.directory, self.plan, name, tensor)
        self.written.add(name)

    def write_all(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in items:
            self.write_hf(name, tensor)

    def write_param(self, param: str, tensor: torch.Tensor) -> None:
        self.write_all(dense_hf_tensors(self.cfg, param, tensor))

    def write_expert(self, layer: int, expert: int, w1_d2f: torch.Tensor, w2_fd: torch.Tensor) -> None:
        self.write_all(expert_hf_tensors(self.cfg, layer, expert, w1_d2f, w2_fd))

    def close(self) -> Path:
        missing = [n for n in self.plan.tensors if n not in self.written]
        if missing:
            raise CheckpointError(f"{self.directory}: export incomplete, {len(missing)} tensor(s) never written, e.g. "
                                  f"{', '.join(missing[:3])}")
        finish(self.directory, self.plan, self.config_json)
        return self.directory

    def __enter__(self) -> HFCheckpointWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
