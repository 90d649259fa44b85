"""Your own data for fine-tuning (``data.source: files``): text / jsonl documents, tokenised, packed with <eod>.

What is accepted (``data.paths``: file paths or globs, ``**`` recursive, matched in the order given, each glob's
matches sorted; a file matched twice counts once):
- ``text`` (any file whose name does not end in ``.jsonl`` under ``data.format: auto``): the whole file, read as
  UTF-8, is ONE document. An empty (or whitespace-only) file is an error naming it.
- ``jsonl`` (``*.jsonl`` under ``auto``): one JSON object per line, its ``data.text_field`` (default ``"text"``) a
  string = one document. Blank lines are skipped; a line that is not a JSON object, lacks the field or holds a
  non-string is an error naming the file and the line number. Empty strings are skipped.

Tokens: the checkpoint's tokenizer when the model comes from a checkpoint with a ``tokenizer.model``
(``checkpoint/text.py`` tokenizer_for), else the byte-level one (BOS + UTF-8 bytes). Every document is followed by
the end-of-document token (``<eod>``; the byte tokenizer's EOS), and the documents of a split are concatenated in
file order into one int32 stream; batches are windows of it at seeded random offsets (data.BatchLoader), so a
window may start inside a document.

Split (``split_documents``, deterministic): by FILE when at least two files hold a document, the stdlib corpus's
rule (``data.assign_split``, sha256 of ``split_seed`` and the file's path relative to the matched files' common
folder); otherwise (one file, or every document in one file) by DOCUMENT, the same rule over the keys
``"<relpath>#<n>"`` (n = the document's index in its file, from 0). Both splits always get at least one document;
fewer than two documents in all is an error naming data.paths, the file and the count.

Documents inside a window (``FileCorpus.documents``): a token's document index counts the <eod> tokens BEFORE it,
so the <eod> belongs to the document it ends (the HF code's ``attention_mask[b, 0, i+1:, :i+1] = 0`` after each
<eod> at i). Attention is restricted to the same document (model/attention.py); positions restart at 0 after an
<eod> only with ``data.reset_positions: true`` (Megatron's reset_position_ids). The default ``false`` matches the
released HF inference code, which computes reset positions in ``_prepare_decoder_attention_mask_training`` and
then drops them (``attention_mask, _ = ...``): positions there run 0..S-1 across documents. The LFA filter (two
kernel-2 convolutions) is NOT restarted at an <eod>, as in the HF ``LocalizedFiltering._train_forward`` (it
convolves the whole row): the first two tokens after an <eod> see the filter inputs before it. The target of an
<eod> position (the next document's first token) is kept in the loss, as with Megatron's eod_mask_loss = False.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_runtime.config import DataConfig, ModelConfig
from moe_runtime.data import Corpus, assign_split, load_corpus, select_split

DocumentKey = tuple[str, int]  # (file relative to the corpus root, index of the document in the file)


@dataclass(frozen=True, eq=False)
class DocumentBatch:
    """Where the documents of packed rows are: passed explicitly with the tokens to MoETransformer.forward/loss."""

    documents_bs: torch.Tensor  # [B, S] long: document index of each token within its row (0, 1, ...)
    positions_bs: torch.Tensor | None  # [B, S] long: position within the document; None = 0..S-1 per row

    def rows(self, rows: slice) -> DocumentBatch:
        pos = None if self.positions_bs is None else self.positions_bs[rows]
        return DocumentBatch(self.documents_bs[rows], pos)

    def to(self, device: torch.device | str) -> DocumentBatch:
        pos = None if self.positions_bs is None else self.positions_bs.to(device)
        return DocumentBatch(self.documents_bs.to(device), pos)


def document_ids(tokens_bs: torch.Tensor, eod_id: int) -> torch.Tensor:
    """[B, S] document index of each token: the number of <eod> tokens strictly before it in its row."""
    eod = (tokens_bs == eod_id).long()
    return eod.cumsum(dim=1) - eod


def positions_in_documents(documents_bs: torch.Tensor) -> torch.Tensor:
    """[B, S] position of each token within its document (0 at a row's start and after each <eod>)."""
    s = documents_bs.shape[1]
    cols = torch.arange(s, device=documents_bs.device).expand_as(documents_bs)
    starts = torch.ones_like(documents_bs, dtype=torch.bool)
    starts[:, 1:] = documents_bs[:, 1:] != documents_bs[:, :-1]
    first = torch.where(starts, cols, torch.zeros_like(cols)).cummax(dim=1).values
    return cols - first


@dataclass(eq=False)
class FileCorpus:
    """Token streams of the two splits of your files (``train`` / ``val`` 1-D torch.int32), for data.BatchLoader."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: list[str]  # files with a document in the split (by document: a file may be in both)
    val_files: list[str]
    train_documents: int
    val_documents: int
    eod_id: int
    tokenizer: str  # "sentencepiece" or "byte"
    reset_positions: bool
    root: str
    fingerprint: str
    split_by: str = "file"  # "file" | "document" (split_documents)

    def split(self, name: str) -> torch.Tensor:
        return select_split(self.train, self.val, name)

    def documents(self, tokens_bs: torch.Tensor) -> DocumentBatch:
        """The documents of batch rows (the model's attention restarts after each <eod>)."""
        docs = document_ids(tokens_bs, self.eod_id)
        return DocumentBatch(docs, positions_in_documents(docs) if self.reset_positions else None)

    def describe(self) -> dict[str, Any]:
        return {
            "source": "files", "root": self.root, "num_files": len(set(self.train_files) | set(self.val_files)),
            "train_files": len(self.train_files), "val_files": len(self.val_files), "split_by": self.split_by,
            "train_documents": self.train_documents, "val_documents": self.val_documents,
            "train_tokens": int(self.train.numel()), "val_tokens": int(self.val.numel()),
            "eod_id": self.eod_id, "tokenizer": self.tokenizer, "reset_positions": self.reset_positions,
            "fingerprint": self.fingerprint,
        }


def match_files(cfg: DataConfig) -> list[Path]:
    """The files of data.paths, in order (each glob's matches sorted), without duplicates; errors name the path."""
    out: list[Path] = []
    seen: set[Path] = set()
    for pattern in cfg.paths:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            found = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
            if not found:
                raise ValueError(f"data.paths: {pattern!r} matched no file")
        else:
            p = Path(expanded)
            if not p.is_file():
                raise ValueError(f"data.paths: {pattern!r} is not a file" + (" (a directory: use a glob such "
                                 f"as '{pattern.rstrip('/')}/**/*.txt')" if p.is_dir() else ""))
            found = [p]
        for p in found:
            r = p.resolve()
            if r not in seen:
                seen.add(r)
                out.append(r)
    if cfg.max_files is not None:
        out = out[: cfg.max_files]
    return out


def _format_of(path: Path, cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    return "jsonl" if path.name.endswith(".jsonl") else "text"


def read_documents(path: Path, cfg: DataConfig) -> list[str]:
    """The documents of one file (see the module docstring); errors name the file (and line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if _format_of(path, cfg) == "text":
        if not text.strip():
            raise ValueError(f"{path}: empty text file (a text file is one document)")
        return [text]
    docs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {n}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict) or cfg.text_field not in obj:
            raise ValueError(f"{path}, line {n}: no {cfg.text_field!r} field (data.text_field); expected a JSON "
                             f"object like {{\"{cfg.text_field}\": \"...\"}}")
        value = obj[cfg.text_field]
        if not isinstance(value, str):
            raise ValueError(f"{path}, line {n}: field {cfg.text_field!r} is {type(value).__name__}, expected a "
                             "string")
        if value:
            docs.append(value)
    return docs


@dataclass(frozen=True)
class DocumentSplit:
    by: str  # "file" | "document"
    train: list[DocumentKey]  # in file order, then document order
    val: list[DocumentKey]


def split_documents(files: list[tuple[str, list[str]]], val_fraction: float, seed: int,
                    field: str = "data.paths") -> DocumentSplit:  # fmt: skip
    """The train/val split of (relpath, documents) in order (the rule: module docstring). Pure."""
    holding = [rel for rel, docs in files if docs]
    if len(holding) >= 2:  # by file
        train_rel, val_rel = assign_split(holding, val_fraction, seed)
        count = dict((rel, len(docs)) for rel, docs in files)
        return DocumentSplit("file", [(r, i) for r in train_rel for i in range(count[r])],
                             [(r, i) for r in val_rel for i in range(count[r])])
    keys = [f"{rel}#{i}" for rel, docs in files for i in range(len(docs))]
    if len(keys) < 2:
        where = holding[0] if holding else ", ".join(rel for rel, _ in files)
        raise ValueError(f"{field}: {where!r} holds {len(keys)} document(s) in all; the train/val split needs at "
                         "least 2 documents (a text file is one document: give several files, or a jsonl file with "
                         "one document per line)")
    train_keys, val_keys = assign_split(keys, val_fraction, seed)

    def parse(key: str) -> DocumentKey:
        rel, _, n = key.rpartition("#")
        return rel, int(n)

    return DocumentSplit("document", [parse(k) for k in train_keys], [parse(k) for k in val_keys])


def _tokenize(keys: list[DocumentKey], tokenizer: Any, eod_id: int, vocab_size: int,
              docs_by_rel: dict[str, list[str]], root: Path) -> tuple[np.ndarray, int]:  # fmt: skip
    """Each document's tokens + <eod>, concatenated in order (int32); returns (stream, documents)."""
    parts: list[np.ndarray] = []
    for rel, n in keys:
        ids = np.asarray([*tokenizer.encode(docs_by_rel[rel][n]), eod_id], dtype=np.int64)
        if ids.max() >= vocab_size or ids.min() < 0:
            bad = int(ids[(ids >= vocab_size) | (ids < 0)][0])
            raise ValueError(f"{root / rel}: encodes to token {bad}, outside the model's vocabulary "
                             f"(model.vocab_size {vocab_size}): the tokenizer does not fit this model")
        parts.append(ids.astype(np.int32))
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)), len(keys)


_MEMORY_CACHE: dict[str, FileCorpus] = {}


def _fingerprint(cfg: DataConfig, model: ModelConfig, paths: list[Path], root: Path) -> str:
    """Hash of what the token streams depend on: the data fields, the tokenizer file, each file's name/size/mtime."""
    h = hashlib.sha256(cfg.model_dump_json(exclude={"reset_positions"}).encode())
    h.update(f"|vocab {model.vocab_size}|checkpoint {model.checkpoint}".encode())
    tok = None if model.checkpoint is None else Path(model.checkpoint) / "tokenizer.model"
    if tok is not None and tok.exists():
        h.update(f"|tokenizer {tok.stat().st_size} {tok.stat().st_mtime_ns}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"|{p.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def clear_memory_cache() -> None:
    _MEMORY_CACHE.clear()


def load_file_corpus(cfg: DataConfig, model: ModelConfig) -> FileCorpus:
    """Read, split (by file, or by document for a single file), tokenise and pack the files of data.paths (kept
    in memory per process, keyed by a fingerprint of the files and the tokenizer: the CLI's up-front check and the
    trainer tokenise once)."""
    if cfg.source != "files":
        raise ValueError(f"data.source = {cfg.source!r}: load_file_corpus reads data.source = 'files'")
    paths = match_files(cfg)
    if not paths:
        raise ValueError(f"data.paths = {cfg.paths!r}: matched no file")
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    fp = _fingerprint(cfg, model, paths, root)
    cached = _MEMORY_CACHE.get(fp)
    if cached is None:
        cached = _MEMORY_CACHE[fp] = _build(cfg, model, paths, root, fp)
    return replace(cached, reset_positions=cfg.reset_positions)  # the streams are shared (read-only)


def _build(cfg: DataConfig, model: ModelConfig, paths: list[Path], root: Path, fp: str) -> FileCorpus:
    from moe_runtime.checkpoint.text import tokenizer_for

    rel = {p: p.relative_to(root).as_posix() for p in paths}
    docs = {p: read_documents(p, cfg) for p in paths}
    if not any(docs.values()):
        raise ValueError(f"data.paths = {cfg.paths!r}: the files hold no document (empty corpus)")
    run_tok = tokenizer_for(model)
    if run_tok.eod_id is None:
        raise ValueError(f"{model.checkpoint}: the tokenizer has no <eod> token to put between documents")
    docs_by_rel = {rel[p]: docs[p] for p in paths}
    split = split_documents([(rel[p], docs[p]) for p in paths], cfg.val_fraction, cfg.split_seed,
                            f"data.paths = {cfg.paths!r}")  # fmt: skip
    train, n_train = _tokenize(split.train, run_tok.tokenizer, run_tok.eod_id, model.vocab_size, docs_by_rel, root)
    val, n_val = _tokenize(split.val, run_tok.tokenizer, run_tok.eod_id, model.vocab_size, docs_by_rel, root)

    def files_of(keys: list[DocumentKey]) -> list[str]:
        return list(dict.fromkeys(r for r, _ in keys))

    return FileCorpus(
        train=torch.from_numpy(train), val=torch.from_numpy(val), train_files=files_of(split.train),
        val_files=files_of(split.val), train_documents=n_train, val_documents=n_val, eod_id=run_tok.eod_id,
        tokenizer=run_tok.kind, reset_positions=cfg.reset_positions, root=str(root), fingerprint=fp,
        split_by=split.by,
    )


def load_training_corpus(cfg: DataConfig, model: ModelConfig, cache_dir: str | Path | None = None
                         ) -> Corpus | FileCorpus:  # fmt: skip
    """The corpus of data.source: the stdlib one (data.load_corpus) or your files."""
    if cfg.source == "files":
        return load_file_corpus(cfg, model)
    return load_corpus(cfg, cache_dir=cache_dir)
