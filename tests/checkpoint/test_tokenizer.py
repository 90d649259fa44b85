"""The checkpoint's SentencePiece tokenizer, with a small model trained here on a few standard-library files."""

from __future__ import annotations

import io
import sysconfig
from pathlib import Path

import pytest
import sentencepiece as spm

from moe_runtime.checkpoint.hf_config import CheckpointError, SpecialTokens
from moe_runtime.checkpoint.tokenizer import TOKENIZER_FILE, SentencePieceTokenizer, load_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXT = "def greet(name):\n    return f'hello {name}'  # 42\n"


def _train(path: Path, special: bool) -> Path:
    lines = []
    for name in ("textwrap.py", "string.py", "json/__init__.py", "fnmatch.py"):
        lines += [line for line in (STDLIB / name).read_text().splitlines() if line.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(  # LLaMA-style: no normalisation, byte fallback, digits split
        sentence_iterator=iter(lines), model_writer=out, vocab_size=400, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True, split_digits=True,
        character_coverage=1.0, user_defined_symbols=["<eod>", "<sep>", "<pad>"] if special else [],
        minloglevel=2,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / TOKENIZER_FILE).write_bytes(out.getvalue())
    return path


@pytest.fixture(scope="module")
def with_pieces(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("sp") / "ck", special=True)


def test_round_trip_and_special_tokens(with_pieces: Path) -> None:
    tok = load_tokenizer(with_pieces)
    assert tok is not None and tok.vocab_size == 400
    ids = tok.encode(TEXT)
    assert ids and all(0 <= i < 400 for i in ids) and tok.decode(ids) == TEXT
    assert {tok.eod_id, tok.sep_id, tok.pad_id} == {tok.sp.piece_to_id(p) for p in ("<eod>", "<sep>", "<pad>")}
    doc = tok.encode("question<sep>answer<eod>next")
    assert doc.count(tok.sep_id) == 1 and doc.count(tok.eod_id) == 1
    assert tok.decode(doc) == "question<sep>answer<eod>next"
    assert tok.decode([*tok.encode("ok"), 5000]) == "ok\ufffd"  # an id past the vocabulary (embedding padding)


def test_special_ids_from_config_when_the_model_lacks_the_pieces(tmp_path: Path) -> None:
    d = _train(tmp_path / "plain", special=False)
    tok = SentencePieceTokenizer(d / TOKENIZER_FILE, SpecialTokens(eod=450, sep=451, pad=452))
    assert (tok.eod_id, tok.sep_id, tok.pad_id) == (450, 451, 452)
    ids = tok.encode("a<eod>b")
    assert ids.count(450) == 1 and tok.decode(ids) == "a<eod>b"
    assert SentencePieceTokenizer(d / TOKENIZER_FILE).eod_id is None


def test_missing_or_broken_tokenizer(tmp_path: Path) -> None:
    assert load_tokenizer(tmp_path) is None
    (tmp_path / TOKENIZER_FILE).write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path)
