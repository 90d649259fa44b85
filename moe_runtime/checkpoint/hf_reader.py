"""Open an HF-layout Yuan checkpoint directory, validate all of it up front, then read tensors one request at a time.

Layouts found (in this order): `model.safetensors.index.json`, `model.safetensors`, `pytorch_model.bin.index.json`,
`pytorch_model.bin`, then index-less shards (`*.safetensors`, or the converter's `pytorch_model*.bin`) mapped by
their own headers. Validation reads headers only: the safetensors JSON header, and for `.bin` shards
`torch.load(mmap=True, weights_only=True)`, which gives shapes without touching the data. Every problem (config,
missing shard file, missing tensor, wrong shape or dtype, unexpected tensor) is collected and raised together,
each naming the file and the tensor, before any weight is read.

Reads are per request: `iter_experts(pairs)` / `read_expert(layer, expert)` for an expert actor's own
(layer, expert) pairs, `iter_dense()` / `read_dense(...)` for a router worker. A safetensors tensor is read with
one `readinto` at its header offset into a fresh tensor (rather than `safe_open`, which maps the file: nothing
stays resident but what was asked). A `.bin` shard stays mapped for one call or iteration (parsing its pickle is
the slow part) and each tensor's pages are given back once it is copied. Conversion to the compute dtype happens
on read; returned tensors never point into a file.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import re
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_runtime.checkpoint.hf_config import CheckpointError, HFModelInfo, parse_hf_config
from moe_runtime.checkpoint.hf_layout import (
    Shape,
    TensorRule,
    dense_rules,
    expected_hf_shapes,
    expert_rules,
    is_ignored_hf_tensor,
)
from moe_runtime.config import ModelConfig

CONFIG_FILE = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
}
_FLOAT_DTYPES = frozenset(SAFETENSORS_DTYPES.values())
_MAX_LISTED = 25  # problems listed in one error before "... and N more"


@dataclass(frozen=True)
class TensorEntry:
    """Where one HF tensor lives and what it is, from the file's header."""

    name: str
    file: str  # file name inside the checkpoint directory
    shape: Shape
    dtype: torch.dtype | None  # None: a dtype this reader does not convert (reported if the tensor is needed)
    nbytes: int
    offset: int | None = None  # safetensors: absolute byte offset of the data in the file


@dataclass(frozen=True)
class CheckpointSummary:
    """What was found: for the "what went where" line a loader prints."""

    directory: str
    format: str  # "safetensors" or "bin"
    index: str | None  # index file name, None for a single file or index-less shards
    files: tuple[tuple[str, int], ...]  # (file name, size in bytes)
    tensors: int
    tensor_bytes: int
    dtypes: Mapping[str, int]  # dtype name -> tensor count
    ignored_tensors: tuple[str, ...]
    unexpected_tensors: tuple[str, ...]
    ignored_config_keys: tuple[str, ...]

    def describe(self) -> str:
        dtypes = ", ".join(f"{n} {k}" for k, n in sorted(self.dtypes.items()))
        where = f"index {self.index}" if self.index else "no index"
        lines = [f"{self.directory}: {self.tensors} tensors ({dtypes}), {self.tensor_bytes / 2**30:.2f} GiB in "
                 f"{len(self.files)} {self.format} file(s), {where}"]
        if self.ignored_tensors:
            lines.append(f"  not used: {', '.join(self.ignored_tensors)}")
        if self.unexpected_tensors:
            lines.append(f"  unexpected (not loaded): {', '.join(self.unexpected_tensors[:10])}"
                         + (f" and {len(self.unexpected_tensors) - 10} more" if len(self.unexpected_tensors) > 10
                            else ""))
        if self.ignored_config_keys:
            lines.append(f"  config keys not read: {', '.join(self.ignored_config_keys)}")
        return "\n".join(lines)


@dataclass
class _Layout:
    format: str
    index: str | None
    weight_map: dict[str, str] | None  # from the index; None = map by reading every file
    files: list[str] = field(default_factory=list)


def _fail(directory: Path, problems: list[str]) -> CheckpointError:
    shown = problems[:_MAX_LISTED]
    more = len(problems) - len(shown)
    text = "\n".join(f"  - {p}" for p in shown) + (f"\n  ... and {more} more" if more else "")
    return CheckpointError(f"{directory}: checkpoint is not usable ({len(problems)} problem(s)):\n{text}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot be read as JSON: {err}") from None


def _discover(directory: Path) -> _Layout:
    for fmt, index, single in (("safetensors", SAFETENSORS_INDEX, SAFETENSORS_SINGLE), ("bin", BIN_INDEX, BIN_SINGLE)):
        if (directory / index).exists():
            data = _read_json(directory / index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise CheckpointError(f"{directory / index}: expected an object with a weight_map of tensor name -> "
                                      "file name")
            return _Layout(fmt, index, dict(weight_map), sorted(set(weight_map.values())))
        if (directory / single).exists():
            return _Layout(fmt, None, None, [single])
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    if shards:
        return _Layout("safetensors", None, None, shards)
    shards = sorted(p.name for p in directory.glob("pytorch_model*.bin"))
    if shards:
        return _Layout("bin", None, None, shards)
    raise CheckpointError(f"{directory}: no weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, "
                          f"{BIN_INDEX}, {BIN_SINGLE}, *.safetensors, pytorch_model*.bin)")


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Entries of one safetensors file from its header alone; checks the data ranges against the file size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} exceeds the file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON: {err}") from None
    start = 8 + n
    out: dict[str, TensorEntry] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in meta["data_offsets"])
            shape = tuple(int(x) for x in meta["shape"])
            dtype_name = str(meta["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: header entry of tensor {name} is malformed: {meta!r}") from None
        if start + end > size or begin > end:
            raise CheckpointError(f"{path}: tensor {name} needs bytes [{begin}, {end}) of the data but the file holds "
                                  f"{size - start} (truncated?)")
        out[name] = TensorEntry(name, path.name, shape, SAFETENSORS_DTYPES.get(dtype_name), end - begin, start + begin)
    return out


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read the file is reported with its name
        raise CheckpointError(f"{path}: cannot be opened as a torch zip checkpoint with mmap: "
                              f"{type(err).__name__}: {err}") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: expected a flat dict of tensor name -> tensor")
    return sd


def _bin_entries(path: Path) -> dict[str, TensorEntry]:
    sd = _load_bin(path)
    return {name: TensorEntry(name, path.name, tuple(t.shape), t.dtype if t.dtype in _FLOAT_DTYPES else None,
                              t.numel() * t.element_size()) for name, t in sd.items()}


class HFCheckpoint:
    """A validated HF-layout Yuan checkpoint. Construction reads config.json and every header; reads come after.

    dtype: what tensors are converted to on read (the compute dtype). strict: unexpected tensors are an error
    (False: they are listed in `summary.unexpected_tensors` and never read). overrides: the run's own ModelConfig
    fields (rope, max_seq_len, rope_base, init_std, aux_loss_coeff). Picklable (an actor can receive the driver's
    validated checkpoint instead of validating again); not for concurrent reads from several threads.
    """

    def __init__(self, directory: str | Path, *, dtype: torch.dtype = torch.float32, strict: bool = True,
                 **overrides: Any):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory")
        config_path = self.directory / CONFIG_FILE
        if not config_path.exists():
            raise CheckpointError(f"{config_path}: missing (an HF checkpoint directory has a config.json)")
        self.dtype = dtype
        self.info: HFModelInfo = parse_hf_config(_read_json(config_path), str(config_path),
                                                 **{"checkpoint": str(self.directory), **overrides})
        self.config: ModelConfig = self.info.model
        self._layout = _discover(self.directory)
        self.entries: dict[str, TensorEntry] = {}
        self._open_bin: tuple[str, dict[str, torch.Tensor]] | None = None
        self.summary = self._validate(strict)

    # ------------------------------------------------------------------------------------------- validation

    def __getstate__(self) -> dict[str, Any]:
        # validated once, shipped to each actor: plain data, never the mapped shard of a read in progress
        return {**self.__dict__, "_open_bin": None}

    def _validate(self, strict: bool) -> CheckpointSummary:
        lay, problems = self._layout, []
        where = lay.index or ", ".join(lay.files)
        found: dict[str, TensorEntry] = {}
        present = []
        for name in lay.files:
            path = self.directory / name
            if not path.exists():
                held = sorted(k for k, v in (lay.weight_map or {}).items() if v == name)
                problems.append(f"missing shard file {name} (listed in {lay.index} for {len(held)} tensor(s), e.g. "
                                f"{', '.join(held[:3])})")
                continue
            present.append((name, path.stat().st_size))
            entries = read_safetensors_header(path) if lay.format == "safetensors" else _bin_entries(path)
            for tname, entry in entries.items():
                if tname in found and lay.weight_map is None:
                    hint = (" (per-pipeline-rank files of the official converter: merge them with its "
                            "tools/concat.py first)" if re.fullmatch(r"pytorch_model_\d+\.bin", name) else "")
                    problems.append(f"tensor {tname} is in both {found[tname].file} and {name}{hint}")
                if lay.weight_map is None or lay.weight_map.get(tname) == name:
                    found[tname] = entry
            if lay.weight_map is not None:
                for tname in sorted(k for k, v in lay.weight_map.items() if v == name and k not in entries):
                    problems.append(f"{lay.index} puts tensor {tname} in {name}, but {name} does not contain it")
        expected = expected_hf_shapes(self.config)
        for tname, shape in expected.items():
            entry = found.get(tname)
            if entry is None:
                if lay.weight_map is None or tname not in lay.weight_map:
                    problems.append(f"missing tensor {tname} (not in {where})")
                continue  # else reported above: its shard file is missing or does not hold it
            if entry.shape != shape:
                problems.append(f"tensor {tname} in {entry.file} has shape {list(entry.shape)}, expected "
                                f"{list(shape)} for this config.json")
            elif entry.dtype is not None and entry.nbytes != _numel(shape) * entry.dtype.itemsize:
                problems.append(f"tensor {tname} in {entry.file} holds {entry.nbytes} bytes, expected "
                                f"{_numel(shape) * entry.dtype.itemsize} for shape {list(shape)} {entry.dtype}")
            if entry.dtype is None:
                problems.append(f"tensor {tname} in {entry.file} has a dtype that is not a float this reader "
                                f"converts ({sorted(SAFETENSORS_DTYPES)})")
        extra = sorted(set(found) - set(expected))
        ignored = tuple(n for n in extra if is_ignored_hf_tensor(n))
        unexpected = tuple(n for n in extra if not is_ignored_hf_tensor(n))
        if strict:
            problems += [f"unexpected tensor {n} in {found[n].file} (not part of this config.json's model)"
                         for n in unexpected]
        if problems:
            raise _fail(self.directory, problems)
        self.entries = {n: found[n] for n in expected}
        dtypes: dict[str, int] = {}
        for e in self.entries.values():
            key = str(e.dtype).removeprefix("torch.")
            dtypes[key] = dtypes.get(key, 0) + 1
        return CheckpointSummary(
            str(self.directory), lay.format, lay.index, tuple(present), len(self.entries),
            sum(e.nbytes for e in self.entries.values()), dtypes, ignored, unexpected, self.info.ignored_keys,
        )

    # ------------------------------------------------------------------------------------------- reads

    def read_hf(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """HF tensors by name, converted to self.dtype; every file is closed again when the call returns."""
        try:
            return self._read(names)
        finally:
            self.release()

    def read_rule(self, rule: TensorRule) -> torch.Tensor:
        try:
            return self._rule(rule)
        finally:
            self.release()

    def read_dense(self, *params: str) -> dict[str, torch.Tensor]:
        """This model's dense tensors by state-dict key (all of them when none is named)."""
        rules = {r.param: r for r in dense_rules(self.config)}
        unknown = [p for p in params if p not in rules]
        if unknown:
            raise KeyError(f"{unknown[0]}: not a dense tensor of this model (expected one of {sorted(rules)[:5]}...)")
        try:
            return {p: self._rule(rules[p]) for p in (params or rules)}
        finally:
            self.release()

    def iter_dense(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(state-dict key, tensor) for every dense tensor, one at a time, in checkpoint order: what a router
        worker loads."""
        try:
            for rule in dense_rules(self.config):
                yield rule.param, self._rule(rule)
        finally:
            self.release()

    def read_expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1_d2f, w2_fd) of one expert in this model's orientation (transposed views of fresh tensors). For many
        experts use iter_experts: it opens each shard once."""
        try:
            return self._expert(layer, expert)
        finally:
            self.release()

    def iter_experts(self, pairs: Iterable[tuple[int, int]]) -> Iterator[tuple[tuple[int, int], torch.Tensor,
                                                                             torch.Tensor]]:
        """((layer, expert), w1_d2f, w2_fd) for the given pairs, one expert at a time, in the order they lie in the
        files (a `.bin` shard's pickle is parsed once for all of its experts, not once per tensor)."""
        order = {n: i for i, n in enumerate(self.entries)}
        files = {f: i for i, f in enumerate(self._layout.files)}

        def position(pair: tuple[int, int]) -> tuple[int, int]:
            name = expert_rules(self.config, *pair)[0].hf_names[0]
            return files[self.entries[name].file], order[name]

        try:
            for layer, expert in sorted(set(pairs), key=position):
                yield (layer, expert), *self._expert(layer, expert)  # no local keeps the last expert alive
        finally:
            self.release()

    def release(self) -> None:
        """Unmap the `.bin` shard kept open between the reads of one call or iteration."""
        self._open_bin = None

    def _rule(self, rule: TensorRule) -> torch.Tensor:
        hf = self._read(rule.hf_names)
        return rule.to_param([hf[n] for n in rule.hf_names])

    def _expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        r1, r2 = expert_rules(self.config, layer, expert)
        hf = self._read(r1.hf_names + r2.hf_names)
        return r1.to_param([hf[r1.hf_names[0]]]), r2.to_param([hf[r2.hf_names[0]]])

    def _read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        unknown = [n for n in names if n not in self.entries]
        if unknown:
            raise KeyError(f"{self.directory}: no tensor {unknown[0]} in this checkpoint's layout")
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.entries[n].file, []).append(n)
        out: dict[str, torch.Tensor] = {}
        for fname, group in by_file.items():
            path = self.directory / fname
            if self._layout.format == "safetensors":
                with path.open("rb") as f:
                    for n in group:
                        out[n] = _read_at(f, path, self.entries[n]).to(self.dtype)
                continue
            if self._open_bin is None or self._open_bin[0] != fname:
                self._open_bin = None  # unmap the previous shard before mapping the next
                self._open_bin = (fname, _load_bin(path))
            sd = self._open_bin[1]
            for n in group:
                if n not in sd:
                    raise CheckpointError(f"{path}: tensor {n} has disappeared since the checkpoint was opened")
                out[n] = sd[n].to(self.dtype, copy=True)  # a copy: nothing returned points into the mapping
                _drop_mapped_pages(sd[n])
        return out

    # ------------------------------------------------------------------------------------------- sizes

    def hf_nbytes(self, names: Iterable[str]) -> int:
        """Bytes on disk of these HF tensors (a memory bound's reference)."""
        return sum(self.entries[n].nbytes for n in names)

    def expert_nbytes(self, pairs: Iterable[tuple[int, int]]) -> int:
        return sum(self.hf_nbytes(r.hf_names[0] for r in expert_rules(self.config, layer, e)) for layer, e in pairs)

    def dense_nbytes(self) -> int:
        return self.hf_nbytes(n for r in dense_rules(self.config) for n in r.hf_names)

    @property
    def largest_tensor_nbytes(self) -> int:
        return max(e.nbytes for e in self.entries.values())


def _read_at(f: Any, path: Path, entry: TensorEntry) -> torch.Tensor:
    """One safetensors tensor: its bytes straight from the file into a new tensor of the stored dtype."""
    assert entry.dtype is not None and entry.offset is not None
    t = torch.empty(entry.shape, dtype=entry.dtype)
    if not entry.nbytes:
        return t
    buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    f.seek(entry.offset)
    got = 0
    while got < entry.nbytes:
        n = f.readinto(buf[got:])
        if not n:
            raise CheckpointError(f"{path}: tensor {entry.name}: read {got} of {entry.nbytes} bytes (truncated?)")
        got += n
    return t


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_MADV_DONTNEED = 4
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _drop_mapped_pages(t: torch.Tensor) -> None:
    """Give back the pages of a tensor read from a mapped `.bin` shard (the shard stays mapped for the next tensor).

    The mapping is private and never written, so the kernel just forgets the pages; without this, every tensor read
    from a shard would stay resident until the shard is unmapped. Best effort: Linux only, errors ignored."""
    if _LIBC is None or not t.numel():
        return
    page = mmap.PAGESIZE
    span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))  # elements a (strided) view reaches
    begin = t.data_ptr() & ~(page - 1)
    end = t.data_ptr() + span * t.element_size()
    _LIBC.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), _MADV_DONTNEED)
