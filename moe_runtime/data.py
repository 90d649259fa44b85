"""Training data: the byte-level text of the running interpreter's standard-library sources.

No download: the corpus is every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, read as raw bytes.

Selection (documented choices, all deterministic):
- recursive ``*.py``; paths sorted by their POSIX relative path;
- skipped directories: ``site-packages`` / ``dist-packages`` (third-party code, differs per environment),
  ``__pycache__``, ``config-*`` (build config), and the test suites ``test``, ``tests``, ``idle_test``. The test
  suites are excluded because several distributions ship them separately (Debian's ``libpython3.X-testsuite``),
  so excluding them keeps the corpus the same across machines with the same Python version, and they contain
  deliberately malformed files (bad encodings, huge generated data);
- ``_sysconfigdata_*.py`` is skipped: it is generated per build machine.

Tokens: the 256 byte values, plus ``BOS = 256``, ``EOS = 257``, ``PAD = 258`` (``VOCAB_SIZE_MIN = 259``; the
presets use a vocabulary of 264). Each file becomes ``BOS + bytes + EOS``; the files of a split are concatenated
in sorted-path order into one int16 stream. PAD never occurs in the streams (it exists for padded inference).

Split: at FILE level. A file goes to validation when ``sha256(f"{split_seed}:{relpath}")`` read as a fraction in
[0, 1) is below ``val_fraction``. The assignment of a file depends only on its relative path and the seed, so it
is stable across machines and across ``max_files`` caps. One exception keeps both splits non-empty on a tiny
capped corpus: if no file falls in validation, the file with the smallest fraction moves there (and if no file
falls in training, the one with the largest fraction moves there).

``max_files`` keeps the first N files in sorted-path order (for tests).

Batches: :class:`BatchLoader` draws ``batch_size`` random offsets into a split from a ``torch.Generator`` seeded
by a hash of ``(seed, step)``; the batch is a pure function of ``(seed, step)``, so data-parallel workers can each
take their rows of the global batch with ``batch(step, rows=slice(...))`` without communicating. Sequences may
cross file boundaries (``... EOS BOS ...``), as in usual LM pretraining on concatenated documents.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_runtime.config import DataConfig

BOS = 256
EOS = 257
PAD = 258
VOCAB_SIZE_MIN = 259

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moe-runtime"
_CACHE_FORMAT = 1


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def list_source_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of the corpus files under `root` (default: the stdlib), sorted."""
    root = stdlib_root() if root is None else Path(root)
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            if not name.endswith(".py") or name.startswith("_sysconfigdata_"):
                continue
            full = Path(dirpath) / name
            if full.is_file():
                out.append(full.relative_to(root).as_posix())
    out.sort()
    return out


def split_fraction(relpath: str, seed: int) -> float:
    """Stable pseudo-random fraction in [0, 1) for a file: sha256 of ``f"{seed}:{relpath}"``."""
    digest = hashlib.sha256(f"{seed}:{relpath}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(relpaths: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """File-level (train, val) split; both keep the input order. See the module docstring for the rule."""
    fracs = {p: split_fraction(p, seed) for p in relpaths}
    val = {p for p in relpaths if fracs[p] < val_fraction}
    if len(relpaths) >= 2:
        if not val:
            val = {min(relpaths, key=lambda p: fracs[p])}
        elif len(val) == len(relpaths):
            val.discard(max(relpaths, key=lambda p: fracs[p]))
    return [p for p in relpaths if p not in val], [p for p in relpaths if p in val]


def _tokenize_files(root: Path, relpaths: list[str]) -> tuple[np.ndarray, int]:
    """BOS + bytes + EOS per file, concatenated; returns (int16 tokens, raw byte count)."""
    parts: list[np.ndarray] = []
    nbytes = 0
    bos = np.array([BOS], dtype=np.int16)
    eos = np.array([EOS], dtype=np.int16)
    for rel in relpaths:
        data = (root / rel).read_bytes()
        nbytes += len(data)
        parts += [bos, np.frombuffer(data, dtype=np.uint8).astype(np.int16), eos]
    if not parts:
        return np.zeros(0, dtype=np.int16), 0
    return np.concatenate(parts), nbytes


def select_split(train: torch.Tensor, val: torch.Tensor, name: str) -> torch.Tensor:
    """The token stream of split `name` ("train" or "val") of a corpus."""
    if name == "train":
        return train
    if name == "val":
        return val
    raise ValueError(f"split = {name!r}: expected 'train' or 'val'")


@dataclass(eq=False)
class Corpus:
    """Token streams of the two splits. ``train`` / ``val`` are 1-D torch.int16 tensors (shared with the cache:
    treat them as read-only)."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: list[str]
    val_files: list[str]
    train_bytes: int
    val_bytes: int
    root: str
    python_version: str
    val_fraction: float
    split_seed: int
    fingerprint: str
    from_disk_cache: bool = False

    @property
    def num_files(self) -> int:
        return len(self.train_files) + len(self.val_files)

    @property
    def num_bytes(self) -> int:
        """Raw source bytes (without BOS/EOS)."""
        return self.train_bytes + self.val_bytes

    def split(self, name: str) -> torch.Tensor:
        return select_split(self.train, self.val, name)

    def documents(self, tokens_bs: torch.Tensor) -> None:
        """No document masks: stdlib windows attend across file boundaries (data_files.FileCorpus has them)."""
        return None

    def describe(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "source": "stdlib",
            "root": self.root,
            "python_version": self.python_version,
            "num_files": self.num_files,
            "num_bytes": self.num_bytes,
            "train_files": len(self.train_files),
            "val_files": len(self.val_files),
            "train_bytes": self.train_bytes,
            "val_bytes": self.val_bytes,
            "train_tokens": int(self.train.numel()),
            "val_tokens": int(self.val.numel()),
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
            "vocab_size_min": VOCAB_SIZE_MIN,
            "fingerprint": self.fingerprint,
            "from_disk_cache": self.from_disk_cache,
        }


def _fingerprint(root: Path, relpaths: list[str], cfg: DataConfig) -> str:
    """Hash of everything the corpus depends on: python version, split parameters, file names/sizes/mtimes."""
    h = hashlib.sha256()
    h.update(
        f"v{_CACHE_FORMAT}|{sys.version}|{cfg.val_fraction!r}|{cfg.split_seed}|{cfg.max_files}\n".encode()
    )
    for rel in relpaths:
        st = (root / rel).stat()
        h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


_MEMORY_CACHE: dict[tuple[str, str], Corpus] = {}


def _cache_path(cache_dir: Path, fingerprint: str, cfg: DataConfig) -> Path:
    ver = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return Path(cache_dir) / f"stdlib-py{ver}-seed{cfg.split_seed}-{fingerprint[:16]}.npz"


def _read_disk_cache(path: Path, fingerprint: str) -> dict[str, Any] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            return {
                "train": z["train"].astype(np.int16, copy=False),
                "val": z["val"].astype(np.int16, copy=False),
                "train_files": [str(s) for s in z["train_files"]],
                "val_files": [str(s) for s in z["val_files"]],
                "train_bytes": int(z["train_bytes"]),
                "val_bytes": int(z["val_bytes"]),
            }
    except (OSError, KeyError, ValueError):
        return None  # missing or unreadable cache: rebuild


def _write_disk_cache(path: Path, fingerprint: str, d: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                fingerprint=np.array(fingerprint),
                train=d["train"],
                val=d["val"],
                train_files=np.array(d["train_files"], dtype=str),
                val_files=np.array(d["val_files"], dtype=str),
                train_bytes=np.array(d["train_bytes"]),
                val_bytes=np.array(d["val_bytes"]),
            )
        os.replace(tmp, path)  # atomic: concurrent loaders never see a partial file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_corpus(
    cfg: DataConfig | None = None, *, root: str | Path | None = None, cache_dir: str | Path | None = None
) -> Corpus:
    """Build (or fetch from the in-memory cache) the corpus described by `cfg`.

    `root` overrides the stdlib directory (tests). `cache_dir` enables an on-disk cache of the token streams
    (pass :data:`DEFAULT_CACHE_DIR` for ``~/.cache/moe-runtime``); the cache file is keyed by the Python version,
    the split seed and a fingerprint of the file list, sizes and mtimes, so a changed stdlib rebuilds it.
    """
    cfg = DataConfig() if cfg is None else cfg
    if cfg.source != "stdlib":
        raise ValueError(f"data.source = {cfg.source!r}: expected 'stdlib'")
    root_path = stdlib_root() if root is None else Path(root).resolve()
    relpaths = list_source_files(root_path)
    if cfg.max_files is not None:
        relpaths = relpaths[: cfg.max_files]
    if not relpaths:
        raise ValueError(f"no *.py files found under {str(root_path)!r}")
    fp = _fingerprint(root_path, relpaths, cfg)
    key = (str(root_path), fp)
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]

    built: dict[str, Any] | None = None
    from_disk = False
    cpath = _cache_path(Path(cache_dir), fp, cfg) if cache_dir is not None else None
    if cpath is not None and cpath.exists():
        built = _read_disk_cache(cpath, fp)
        from_disk = built is not None
    if built is None:
        train_files, val_files = assign_split(relpaths, cfg.val_fraction, cfg.split_seed)
        train, train_bytes = _tokenize_files(root_path, train_files)
        val, val_bytes = _tokenize_files(root_path, val_files)
        built = {
            "train": train,
            "val": val,
            "train_files": train_files,
            "val_files": val_files,
            "train_bytes": train_bytes,
            "val_bytes": val_bytes,
        }
        if cpath is not None:
            _write_disk_cache(cpath, fp, built)

    corpus = Corpus(
        train=torch.from_numpy(np.ascontiguousarray(built["train"])),
        val=torch.from_numpy(np.ascontiguousarray(built["val"])),
        train_files=built["train_files"],
        val_files=built["val_files"],
        train_bytes=built["train_bytes"],
        val_bytes=built["val_bytes"],
        root=str(root_path),
        python_version=sys.version.split()[0],
        val_fraction=cfg.val_fraction,
        split_seed=cfg.split_seed,
        fingerprint=fp,
        from_disk_cache=from_disk,
    )
    _MEMORY_CACHE[key] = corpus
    return corpus


def clear_memory_cache() -> None:
    _MEMORY_CACHE.clear()


# ----------------------------------------------------------------------------------------------- batches


def _step_seed(seed: int, step: int, stream: str) -> int:
    """63-bit generator seed from (stream, seed, step): a hash, so nearby (seed, step) pairs are unrelated."""
    digest = hashlib.sha256(f"{stream}:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def _gather(tokens: torch.Tensor, offsets: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = offsets[:, None] + torch.arange(seq_len + 1)
    chunk = tokens[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def _draw_offsets(n_tokens: int, batch_size: int, seq_len: int, gen_seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(gen_seed)
    return torch.randint(0, n_tokens - seq_len, (batch_size,), generator=g)


class BatchLoader:
    """Fixed-length LM batches from one split of a corpus.

    ``batch(step)`` returns ``(inputs, targets)``, both ``[batch_size, seq_len]`` torch.long, with
    ``targets[:, t] == inputs[:, t + 1]`` inside the window (targets are the stream shifted by one). The
    ``batch_size`` offsets of a step are drawn all at once from a generator seeded by ``hash(seed, step)``, so the
    result is a pure function of ``(seed, step)`` and ``batch(step, rows=s)`` equals ``batch(step)[..][s]``.
    """

    def __init__(self, corpus: Corpus, batch_size: int, seq_len: int, seed: int = 0, split: str = "train"):
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size = {batch_size}, seq_len = {seq_len}: both must be > 0")
        self.corpus = corpus
        self.tokens = corpus.split(split)
        self.split = split
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        if self.tokens.numel() < seq_len + 1:
            raise ValueError(
                f"seq_len = {seq_len}: the {split} split has only {self.tokens.numel()} tokens "
                f"(needs >= seq_len + 1); raise data.max_files or add data.paths files"
            )

    def offsets(self, step: int) -> torch.Tensor:
        """Start offsets of the global batch of `step` ([batch_size] long)."""
        if step < 0:
            raise ValueError(f"step = {step}: must be >= 0")
        return _draw_offsets(
            self.tokens.numel(), self.batch_size, self.seq_len, _step_seed(self.seed, step, self.split)
        )

    def batch(self, step: int, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of `step`, or only its `rows` (a data-parallel worker's share)."""
        off = self.offsets(step)
        if rows is not None:
            if not isinstance(rows, slice):
                raise TypeError(f"rows = {rows!r}: expected a slice")
            off = off[rows]
        return _gather(self.tokens, off, self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = 0
        while True:
            yield self.batch(step)
            step += 1

    def val_batches(
        self, n: int, batch_size: int | None = None, seq_len: int | None = None, seed: int = 0
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`n` fixed validation batches from the corpus's val split (independent of this loader's seed)."""
        return val_batches(self.corpus, n, batch_size or self.batch_size, seq_len or self.seq_len, seed=seed)


def val_batches(
    corpus: Corpus, n: int, batch_size: int, seq_len: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` deterministic validation batches ``[(inputs, targets), ...]`` from ``corpus.val``; the same for every
    training seed, so validation losses of different runs are comparable."""
    tokens = corpus.val
    if tokens.numel() < seq_len + 1:
        raise ValueError(
            f"seq_len = {seq_len}: the val split has only {tokens.numel()} tokens; raise data.max_files or add "
            "data.paths files (or data.val_fraction)"
        )
    out = []
    for i in range(n):
        off = _draw_offsets(tokens.numel(), batch_size, seq_len, _step_seed(seed, i, "val-fixed"))
        out.append(_gather(tokens, off, seq_len))
    return out
