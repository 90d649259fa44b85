"""data.source: files (moe_runtime/data_files.py): matching, reading text / jsonl, tokenising with <eod> between
documents, the file-level split, document ids and positions of packed rows, bad inputs, the in-process trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_runtime.config import DataConfig, ModelConfig, parse_config
from moe_runtime.data import BOS, EOS, BatchLoader
from moe_runtime.data_files import (
    clear_memory_cache,
    document_ids,
    load_file_corpus,
    load_training_corpus,
    match_files,
    positions_in_documents,
)

TINY = ModelConfig(preset="tiny")


def write_corpus(root: Path) -> dict[str, list[str]]:
    """Three text files (one document each) and two jsonl files; returns each file's documents."""
    docs = {
        "a.txt": ["def f(x):\n    return x + 1\n" * 3],
        "b.txt": ["The quick brown fox jumps over the lazy dog.\n" * 4],
        "sub/c.txt": ["import os\nprint(os.getcwd())\n" * 3],
        "d.jsonl": ["first json document", "second one, a little longer " * 3, "third ü €"],
        "e.jsonl": ["alpha beta gamma " * 4, "delta"],
    }
    for name, texts in docs.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".jsonl"):
            lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
            p.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")  # a blank line is skipped
        else:
            p.write_text(texts[0])
    return docs


def files_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source="files", paths=[str(root / "**" / "*.txt"), str(root / "*.jsonl")],
                      val_fraction=0.3, **kw)  # fmt: skip


def test_document_ids_and_positions_restart_after_each_eod():
    tokens = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9], [EOS, 1, 2, 3, 4, 5, 6, 7]])
    docs = document_ids(tokens, EOS)
    assert docs.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]  # <eod> ends its own document
    assert positions_in_documents(docs).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]


def test_files_are_tokenised_with_eod_between_documents_and_split_by_file(tmp_path):
    docs = write_corpus(tmp_path)
    corpus = load_file_corpus(files_cfg(tmp_path), TINY)
    assert sorted(corpus.train_files + corpus.val_files) == sorted(docs)
    assert corpus.train_files and corpus.val_files
    for split, files in (("train", corpus.train_files), ("val", corpus.val_files)):
        expected = [t for f in files for text in docs[f] for t in (BOS, *text.encode(), EOS)]  # byte tokenizer
        assert corpus.split(split).tolist() == expected
        assert corpus.split(split).dtype == torch.int32
    assert corpus.train_documents + corpus.val_documents == sum(len(v) for v in docs.values())
    clear_memory_cache()
    again = load_file_corpus(files_cfg(tmp_path), TINY)
    assert again.train_files == corpus.train_files and torch.equal(again.train, corpus.train)  # deterministic
    assert again.train is not corpus.train  # rebuilt, not the cached stream
    (tmp_path / "a.txt").write_text("changed!")  # an edited file is read again (the key has its size and mtime)
    edited = load_file_corpus(files_cfg(tmp_path), TINY)
    split = edited.train if "a.txt" in edited.train_files else edited.val
    text = bytes(t for t in split.tolist() if t < 256)
    assert b"changed!" in text and b"def f(x)" not in text
    other = load_file_corpus(files_cfg(tmp_path, split_seed=7), TINY)
    assert sorted(other.train_files + other.val_files) == sorted(docs)
    d = corpus.describe()
    assert d["source"] == "files" and d["tokenizer"] == "byte" and d["eod_id"] == EOS


def test_batches_carry_documents_and_positions_only_on_request(tmp_path):
    write_corpus(tmp_path)
    corpus = load_training_corpus(files_cfg(tmp_path), TINY)
    x, y = BatchLoader(corpus, 4, 48, seed=1).batch(0)
    assert torch.equal(x[:, 1:], y[:, :-1])
    plain = corpus.documents(x)
    assert plain.positions_bs is None and torch.equal(plain.documents_bs, document_ids(x, EOS))
    assert (plain.documents_bs.amax(dim=1) > 0).any()  # some row holds several documents
    reset = load_training_corpus(files_cfg(tmp_path, reset_positions=True), TINY).documents(x)
    assert torch.equal(reset.positions_bs, positions_in_documents(reset.documents_bs))


def test_sentencepiece_tokenizer_of_the_checkpoint_is_used(tmp_path):
    from moe_runtime.checkpoint.run_config import resolve_checkpoint
    from moe_runtime.checkpoint.text import tokenizer_for
    from tests.runtime.hf_fixtures import make_checkpoint

    ckpt, _, _ = make_checkpoint(tmp_path / "ckpt", shards=1)
    docs = write_corpus(tmp_path / "data")
    cfg = resolve_checkpoint({"model": {"checkpoint": str(ckpt)},
                              "data": files_cfg(tmp_path / "data").model_dump(mode="json")}, "<test>")
    corpus = load_file_corpus(cfg.data, cfg.model)
    tok = tokenizer_for(cfg.model)
    assert corpus.tokenizer == "sentencepiece" and corpus.eod_id == tok.eod_id
    expected = [t for f in corpus.train_files for text in docs[f] for t in (*tok.tokenizer.encode(text), tok.eod_id)]
    assert corpus.train.tolist() == expected
    assert (corpus.train == corpus.eod_id).sum() == corpus.train_documents


def test_the_in_process_trainer_reads_files(tmp_path):
    from moe_runtime.training import InProcessTrainer

    write_corpus(tmp_path)
    cfg = parse_config({"model": {"preset": "tiny"}, "data": files_cfg(tmp_path).model_dump(mode="json"),
                        "train": {"steps": 2, "batch_size": 4, "seq_len": 32, "warmup_steps": 1, "val_batches": 1}})
    a, b = InProcessTrainer(cfg).run(2), InProcessTrainer(cfg).run(2)
    assert a.losses == b.losses and all(torch.isfinite(torch.tensor(a.losses)))
    inputs, targets = InProcessTrainer(cfg).loader.batch(0)
    tr = InProcessTrainer(cfg)
    masked = tr.model.loss(inputs, targets, documents_bs=document_ids(inputs, EOS))[1]
    unmasked = tr.model.loss(inputs, targets)[1]
    torch.testing.assert_close(masked, torch.tensor(a.losses[0]), rtol=1e-5, atol=0)  # the trainer masks
    assert not torch.isclose(masked, unmasked)


# ----------------------------------------------------------------------------------------------- bad inputs


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"data.paths = \[\]"):
        DataConfig(source="files")
    with pytest.raises(ValueError, match="only read with data.source = 'files'"):
        DataConfig(paths=["x.txt"])
    with pytest.raises(ValueError, match="format"):
        DataConfig(source="files", paths=["x"], format="csv")


def test_no_file_matched(tmp_path):
    with pytest.raises(ValueError, match=r"'.*nothing/\*\.txt' matched no file"):
        match_files(DataConfig(source="files", paths=[str(tmp_path / "nothing" / "*.txt")]))
    with pytest.raises(ValueError, match="is not a file"):
        match_files(DataConfig(source="files", paths=[str(tmp_path / "missing.txt")]))
    with pytest.raises(ValueError, match="a directory: use a glob"):
        match_files(DataConfig(source="files", paths=[str(tmp_path)]))


def test_jsonl_errors_name_file_and_line(tmp_path):
    (tmp_path / "ok.txt").write_text("some text")
    bad = tmp_path / "bad.jsonl"
    cfg = DataConfig(source="files", paths=[str(tmp_path / "ok.txt"), str(bad)])
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: no 'text' field"):
        load_file_corpus(cfg, TINY)
    bad.write_text('{"text": "fine"}\n\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: field 'text' is int"):
        load_file_corpus(cfg, TINY)
    bad.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid JSON"):
        load_file_corpus(cfg, TINY)
    bad.write_text('["a list"]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 1: no 'text' field"):
        load_file_corpus(cfg, TINY)


def test_empty_corpus_and_too_few_files(tmp_path):
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text('{"text": ""}\n\n')
    with pytest.raises(ValueError, match="hold no document"):
        load_file_corpus(DataConfig(source="files", paths=[str(tmp_path / "*.jsonl")]), TINY)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"empty\.txt: empty text file"):
        load_file_corpus(DataConfig(source="files", paths=[str(tmp_path / "*.txt"), str(tmp_path / "a.jsonl")]),
                         TINY)
    (tmp_path / "one.txt").write_text("just one")  # one file of one document: nothing to split
    with pytest.raises(ValueError, match=r"data.paths = \[.*one\.txt'\]: 'one.txt' holds 1 document\(s\) in all; "
                                         r"the train/val split needs at least 2 documents"):  # fmt: skip
        load_file_corpus(DataConfig(source="files", paths=[str(tmp_path / "one.txt")]), TINY)
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=r"latin\.txt: not UTF-8"):
        load_file_corpus(DataConfig(source="files", paths=[str(tmp_path / "one.txt"), str(tmp_path / "latin.txt")]),
                         TINY)


def test_tokens_outside_the_vocabulary_are_refused(tmp_path):
    write_corpus(tmp_path)
    small = ModelConfig(preset="tiny", vocab_size=200)  # bytes >= 200 and BOS/EOS do not fit
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \(model.vocab_size 200\)"):
        load_file_corpus(files_cfg(tmp_path), small)


def test_train_command_fails_on_a_bad_file_before_anything_starts(tmp_path):
    from typer.testing import CliRunner

    from moe_runtime.cli import app

    write_corpus(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{preset: tiny}}\ndata: {{source: files, paths: ['{tmp_path}/*.jsonl']}}\n"
                   "train: {steps: 1, batch_size: 4, seq_len: 32}\n")
    result = CliRunner().invoke(app, ["train", "--config", str(cfg)])  # cluster run: refused before Ray starts
    assert result.exit_code == 2, result.output
    assert "bad.jsonl, line 2: no 'text' field" in result.stderr and "Traceback" not in result.stderr
    cfg.write_text("model: {preset: tiny}\ndata: {source: files}\n")
    result = CliRunner().invoke(app, ["train", "--config", str(cfg), "--in-process"])
    assert result.exit_code == 2 and "data.paths = []" in result.stderr


def _jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_a_single_file_is_split_by_document(tmp_path):
    """One jsonl file: its documents are split by the file rule over "<relpath>#<n>" keys (sha256 of the seed and
    the key), in file order; every document lands in exactly one split; the same inputs give the same split."""
    from moe_runtime.data import split_fraction

    texts = [f"document number {i} " * (1 + i % 3) for i in range(40)]
    _jsonl(tmp_path / "all.jsonl", texts)
    cfg = DataConfig(source="files", paths=[str(tmp_path / "all.jsonl")], val_fraction=0.2)
    corpus = load_file_corpus(cfg, TINY)
    assert corpus.split_by == "document" and corpus.train_files == corpus.val_files == ["all.jsonl"]
    val = [i for i in range(40) if split_fraction(f"all.jsonl#{i}", 0) < 0.2]  # the documented rule
    assert 0 < len(val) < 40
    for split, idx in (("train", [i for i in range(40) if i not in val]), ("val", val)):
        expected = [t for i in idx for t in (BOS, *texts[i].encode(), EOS)]
        assert corpus.split(split).tolist() == expected
    assert (corpus.train_documents, corpus.val_documents) == (40 - len(val), len(val))
    assert corpus.describe()["split_by"] == "document" and corpus.describe()["num_files"] == 1
    clear_memory_cache()
    again = load_file_corpus(cfg, TINY)
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)  # deterministic
    other = load_file_corpus(cfg.model_copy(update={"split_seed": 5}), TINY)
    assert not torch.equal(other.val, corpus.val)  # the seed moves documents: the rule is really applied
    loader = BatchLoader(corpus, 2, 16, seed=0)  # batches come from it like from any corpus
    assert loader.batch(0)[0].shape == (2, 16)


def test_two_documents_in_one_file_each_go_to_one_split_and_too_few_files_fall_back(tmp_path):
    """The smallest case: both splits get a document whatever val_fraction; a second file that holds no
    document (only empty strings) leaves one file with documents: split by document too."""
    _jsonl(tmp_path / "pair.jsonl", ["first", "second"])
    tiny_val = load_file_corpus(DataConfig(source="files", paths=[str(tmp_path / "pair.jsonl")],
                                           val_fraction=0.001), TINY)  # fmt: skip
    assert (tiny_val.train_documents, tiny_val.val_documents) == (1, 1)
    _jsonl(tmp_path / "empty.jsonl", ["", ""])
    both = load_file_corpus(DataConfig(source="files", paths=[str(tmp_path / "*.jsonl")], val_fraction=0.001),
                            TINY)  # fmt: skip
    assert both.split_by == "document" and both.train_files == both.val_files == ["pair.jsonl"]
    assert torch.equal(both.train, tiny_val.train) and torch.equal(both.val, tiny_val.val)
    _jsonl(tmp_path / "more.jsonl", ["third"])  # now two files hold documents: split by file again
    by_file = load_file_corpus(DataConfig(source="files", paths=[str(tmp_path / "*.jsonl")]), TINY)
    assert by_file.split_by == "file" and sorted(by_file.train_files + by_file.val_files) == ["more.jsonl",
                                                                                              "pair.jsonl"]
