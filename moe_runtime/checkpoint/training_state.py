"""Checkpoints: safetensors files + a JSON manifest, committed atomically.

Layout under a checkpoint root (e.g. ``runs/checkpoints``)::

    LATEST                          {"dir": "step-00000005-1a2b3c4d", "step": 5}  <- the commit point
    step-00000005-1a2b3c4d/
        experts-a0.safetensors      the (layer, expert) shards written by expert actor 0 (see below)
        experts-a1.safetensors      ...
        dense.safetensors           router-worker state: model tensors + AdamW state (identical on every worker)
        manifest.json               format, step, config, placement, files (name, sha256, bytes, shards)

Expert shard keys are ``l{layer}.e{expert}.{name}`` with name in ``w1``, ``w2`` (the weights) and, once the
optimizer has stepped, ``w1.exp_avg``, ``w1.exp_avg_sq``, ``w1.step`` (and the same for ``w2``). Every logical
(layer, expert) is written exactly once (by its first replica), so a checkpoint is keyed by (layer, expert), not
by actor: it restores onto any number of expert actors and any placement.

Dense keys are ``model.{state_dict key}`` and ``opt.{parameter name}.{exp_avg|exp_avg_sq|step}``.

Atomicity: every save goes to a fresh directory (step number + random suffix). Files are written and fsynced,
then ``manifest.json`` (temp file, fsync, ``os.replace``), then ``LATEST`` the same way, then the parent directory
is fsynced. A save killed at any point therefore leaves ``LATEST`` pointing at the previous, complete checkpoint;
the half-written directory has no manifest and is removed by the next successful save. ``load_manifest`` verifies
every file's sha256 before anything is loaded.

Expert actors write their own shard files (the files must be on storage every process can reach: one machine or
a shared filesystem); the driver writes nothing but the manifest and ``LATEST``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

FORMAT = 1
LATEST = "LATEST"
MANIFEST = "manifest.json"
DENSE_FILE = "dense.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{8})-[0-9a-f]{8}$")
OPT_FIELDS = ("exp_avg", "exp_avg_sq", "step")

Key = tuple[int, int]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


# ------------------------------------------------------------------------------------------------ files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old content or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class FileRecord:
    name: str  # relative to the step directory
    sha256: str
    bytes: int
    kind: str  # "experts" | "dense"
    shards: tuple[Key, ...] = ()  # (layer, expert) pairs in an experts file

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shards"] = [list(k) for k in self.shards]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FileRecord:
        return cls(str(d["name"]), str(d["sha256"]), int(d["bytes"]), str(d["kind"]),
                   tuple((int(a), int(b)) for a, b in d.get("shards", ())))


def write_tensor_file(path: Path, tensors: Mapping[str, torch.Tensor], *, kind: str,
                      shards: Iterable[Key] = ()) -> FileRecord:
    """One safetensors file, fsynced; returns its record (sha256 of the exact bytes written)."""
    path = Path(path)
    data = st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return FileRecord(path.name, hashlib.sha256(data).hexdigest(), len(data), kind, tuple(sorted(shards)))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ manifest


@dataclass
class Manifest:
    step: int  # the next step to run (= number of optimizer steps taken)
    config: dict
    placement: dict
    files: list[FileRecord]
    directory: Path | None = None  # where it was read from (not serialised)
    created: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)  # e.g. the losses of the steps before `step`
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps({
            "format": self.format, "step": self.step, "created": self.created, "config": self.config,
            "placement": self.placement, "files": [f.to_dict() for f in self.files], "extra": self.extra,
        }, indent=1)

    @classmethod
    def from_json(cls, text: str, directory: Path | None = None) -> Manifest:
        where = directory / MANIFEST if directory is not None else MANIFEST
        try:
            d = json.loads(text)
        except ValueError as err:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise CheckpointError(f"{where}: manifest format {d.get('format')!r}: this code reads format {FORMAT}")
        try:
            return cls(step=int(d["step"]), config=d["config"], placement=d["placement"],
                       files=[FileRecord.from_dict(f) for f in d["files"]], directory=directory,
                       created=float(d.get("created", 0.0)), extra=d.get("extra", {}))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: malformed manifest ({type(err).__name__}: {err})") from None

    def shard_index(self) -> dict[Key, FileRecord]:
        out: dict[Key, FileRecord] = {}
        for rec in self.files:
            for k in rec.shards:
                if k in out:
                    raise CheckpointError(f"shard {k} is in both {out[k].name} and {rec.name}")
                out[k] = rec
        return out

    def dense_file(self) -> FileRecord:
        dense = [f for f in self.files if f.kind == "dense"]
        if len(dense) != 1:
            raise CheckpointError(f"manifest lists {len(dense)} dense files: expected exactly 1")
        return dense[0]

    def path(self, rec: FileRecord) -> Path:
        assert self.directory is not None
        return self.directory / rec.name


def new_step_dir(root: str | Path, step: int) -> Path:
    """A fresh, empty directory for one save (never one a committed checkpoint uses)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    d = root / f"step-{step:08d}-{secrets.token_hex(4)}"
    d.mkdir()
    return d


def commit(step_dir: Path, manifest: Manifest, *, keep: int = 2) -> Path:
    """Verify the files, write the manifest, then move LATEST to this directory (the commit point).
    Afterwards removes directories without a manifest (interrupted saves) and all but the `keep` newest
    committed checkpoints."""
    step_dir = Path(step_dir)
    names = {f.name for f in manifest.files}
    if len(names) != len(manifest.files):
        raise CheckpointError("manifest lists a file twice")
    for rec in manifest.files:
        p = step_dir / rec.name
        if not p.is_file() or p.stat().st_size != rec.bytes:
            raise CheckpointError(f"{p}: missing or not {rec.bytes} bytes; not committing")
    manifest.shard_index()
    manifest.dense_file()
    atomic_write(step_dir / MANIFEST, manifest.to_json().encode())
    root = step_dir.parent
    atomic_write(root / LATEST, json.dumps({"dir": step_dir.name, "step": manifest.step}).encode())
    _prune(root, current=step_dir.name, keep=keep)
    return step_dir


def _prune(root: Path, current: str, keep: int) -> None:
    committed = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if not m or not d.is_dir() or d.name == current:
            continue
        if (d / MANIFEST).is_file():
            committed.append(((d / MANIFEST).stat().st_mtime_ns, d))
        else:
            shutil.rmtree(d, ignore_errors=True)
    committed.sort()  # by commit time (not step: after a rollback a newer save can have a lower step)
    for _, d in committed[: max(0, len(committed) - (keep - 1))]:
        shutil.rmtree(d, ignore_errors=True)


def latest_dir(root: str | Path) -> Path | None:
    """The committed checkpoint directory LATEST points at, or None if there is none."""
    root = Path(root)
    p = root / LATEST
    if not p.is_file():
        return None
    try:
        d = root / json.loads(p.read_bytes().decode())["dir"]
    except (ValueError, KeyError, TypeError) as err:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{p}: unreadable ({err!r})") from None
    return d


def load_manifest(path: str | Path, *, verify: bool = True) -> Manifest:
    """Read a checkpoint: `path` is a checkpoint root (follows LATEST) or one step directory.
    With `verify`, every file must exist and match its sha256."""
    path = Path(path)
    d = latest_dir(path) if (path / LATEST).exists() else path
    if d is None or not (d / MANIFEST).is_file():
        raise CheckpointError(f"{path}: no committed checkpoint (no {LATEST} pointer or {MANIFEST})")
    try:
        text = (d / MANIFEST).read_bytes().decode()
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{d / MANIFEST}: not UTF-8 text ({err})") from None
    manifest = Manifest.from_json(text, directory=d)
    if verify:
        for rec in manifest.files:
            p = d / rec.name
            if not p.is_file():
                raise CheckpointError(f"{p}: listed in the manifest but missing")
            if _sha256_file(p) != rec.sha256:
                raise CheckpointError(f"{p}: sha256 does not match the manifest (corrupt or partial)")
    return manifest


def committed_dirs(root: str | Path) -> list[Path]:
    """Every step directory under `root` with a manifest, newest commit first (LATEST's first when it is one)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [((d / MANIFEST).stat().st_mtime_ns, d) for d in root.iterdir()
             if _STEP_DIR.match(d.name) and (d / MANIFEST).is_file()]  # fmt: skip
    dirs = [d for _, d in sorted(found, reverse=True)]
    try:
        latest = latest_dir(root)
    except CheckpointError:
        latest = None
    if latest in dirs:
        dirs.remove(latest)
        dirs.insert(0, latest)
    return dirs


@dataclass(frozen=True)
class GoodCheckpoint:
    """The newest checkpoint under a root that verified, and why each newer one was passed over."""

    manifest: Manifest
    skipped: tuple[str, ...]  # "dir: reason" of every newer checkpoint that failed to verify


def load_latest_good(root: str | Path) -> GoodCheckpoint:
    """The newest committed checkpoint under `root` whose manifest reads and whose files all match their sha256,
    falling back past corrupt or truncated ones (a damaged newest save must not stop a rollback while an
    older good one is on disk). `root` may also be one step directory (no fallback then)."""
    root = Path(root)
    if not (root / LATEST).exists() and (root / MANIFEST).is_file():
        return GoodCheckpoint(load_manifest(root, verify=True), ())
    skipped: list[str] = []
    for d in committed_dirs(root):
        try:
            return GoodCheckpoint(load_manifest(d, verify=True), tuple(skipped))
        except CheckpointError as err:
            skipped.append(f"{d.name}: {err}")
    if skipped:
        raise CheckpointError(f"{root}: no checkpoint verifies: " + "; ".join(skipped))
    return GoodCheckpoint(load_manifest(root, verify=True), ())  # raises: nothing committed


# ------------------------------------------------------------------------------------------------ experts


def shard_key(layer: int, expert: int, name: str) -> str:
    return f"l{layer}.e{expert}.{name}"


def write_expert_file(path: Path, shards: Mapping[Key, Mapping[str, torch.Tensor]]) -> FileRecord:
    """`shards[(layer, expert)]` = {"w1", "w2", optional "w1.exp_avg", ...}: one safetensors file."""
    flat = {shard_key(l, e, n): t for (l, e), d in shards.items() for n, t in d.items()}
    return write_tensor_file(path, flat, kind="experts", shards=shards.keys())


def read_expert_shards(manifest: Manifest, keys: Iterable[Key]) -> dict[Key, dict[str, torch.Tensor]]:
    """The stored tensors of the given (layer, expert) pairs, whatever actor wrote them."""
    index = manifest.shard_index()
    wanted: dict[str, list[Key]] = {}
    for k in keys:
        k = (int(k[0]), int(k[1]))
        if k not in index:
            raise CheckpointError(f"checkpoint {manifest.directory} has no shard for (layer {k[0]}, expert {k[1]})")
        wanted.setdefault(index[k].name, []).append(k)
    out: dict[Key, dict[str, torch.Tensor]] = {}
    for name, ks in wanted.items():
        with safe_open(str(manifest.directory / name), framework="pt") as f:
            names = list(f.keys())
            for (layer, expert) in ks:
                prefix = shard_key(layer, expert, "")
                out[(layer, expert)] = {n[len(prefix):]: f.get_tensor(n) for n in names if n.startswith(prefix)}
    return out


# ------------------------------------------------------------------------------------------------ optimizer state


def optimizer_tensors(opt: torch.optim.Optimizer | None, names: Mapping[int, str]) -> dict[str, torch.Tensor]:
    """AdamW state as flat tensors ``{name}.{exp_avg|exp_avg_sq|step}`` of the parameters named in `names`
    (id(param) -> name); parameters not in `names` are skipped. None (an optimizer not built yet): no state."""
    out: dict[str, torch.Tensor] = {}
    for p, st in (opt.state.items() if opt is not None else ()):
        if not st or id(p) not in names:
            continue
        name = names[id(p)]
        for f in OPT_FIELDS:
            t = st[f]
            out[f"{name}.{f}"] = t.detach().clone() if torch.is_tensor(t) else torch.tensor(float(t))
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, params: Mapping[str, torch.Tensor],
                           tensors: Mapping[str, torch.Tensor]) -> None:
    """Inverse of `optimizer_tensors`: replaces the whole state. A parameter with no stored state starts fresh;
    stored state for an unknown parameter is an error."""
    known = {f"{n}.{f}" for n in params for f in OPT_FIELDS}
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise CheckpointError(f"optimizer state for unknown parameters: {unknown[:5]}")
    opt.state.clear()
    for name, p in params.items():
        fields = [f"{name}.{f}" for f in OPT_FIELDS]
        present = [f in tensors for f in fields]
        if not any(present):
            continue
        if not all(present):
            raise CheckpointError(f"optimizer state of {name}: has {[f for f in fields if f in tensors]}, needs all")
        ea, eas, step = (tensors[f] for f in fields)
        if ea.shape != p.shape or eas.shape != p.shape:
            raise CheckpointError(f"optimizer state of {name}: shape {list(ea.shape)} != parameter {list(p.shape)}")
        opt.state[p] = {
            "step": step.detach().to(torch.float32).reshape(()).clone(),
            "exp_avg": ea.detach().to(p.device, p.dtype).clone(),
            "exp_avg_sq": eas.detach().to(p.device, p.dtype).clone(),
        }


# ------------------------------------------------------------------------------------------------ dense state


def dense_tensors(model: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    out.update({f"opt.{k}": v for k, v in optimizer_tensors(opt, names).items()})
    return out


def load_dense_tensors(model: nn.Module, opt: torch.optim.Optimizer | None,
                       tensors: Mapping[str, torch.Tensor]) -> None:
    """Strict: every model key must be present and nothing else. `opt` None: `tensors` must hold no optimizer
    state (the caller's optimizer, not built yet, starts fresh)."""
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    other = [k for k in tensors if not k.startswith(("model.", "opt."))]
    if other:
        raise CheckpointError(f"dense state has unexpected keys {other[:5]}")
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise CheckpointError(f"dense state does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    opt_state = {k[len("opt."):]: v for k, v in tensors.items() if k.startswith("opt.")}
    if opt is None and opt_state:
        raise CheckpointError(f"dense state has optimizer state ({len(opt_state)} tensors) but no optimizer to load it")
    model.load_state_dict(state, strict=True)
    if opt is not None:
        load_optimizer_tensors(opt, dict(model.named_parameters()), opt_state)


def read_dense(manifest: Manifest) -> dict[str, torch.Tensor]:
    rec = manifest.dense_file()
    with safe_open(str(manifest.path(rec)), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
