"""Corpus (stdlib bytes), file-level split and the seeded batch loader."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from moe_runtime.config import DataConfig
from moe_runtime.data import (
    BOS,
    EOS,
    PAD,
    VOCAB_SIZE_MIN,
    BatchLoader,
    clear_memory_cache,
    list_source_files,
    load_corpus,
    stdlib_root,
    val_batches,
)

SMALL = DataConfig(max_files=20)


def _split_streams(stream: torch.Tensor) -> list[bytes]:
    """Cut a BOS ... EOS stream back into file contents (independent of the loader's code)."""
    vals = stream.tolist()
    files, cur = [], None
    for v in vals:
        if v == BOS:
            assert cur is None, "BOS inside a file"
            cur = []
        elif v == EOS:
            assert cur is not None, "EOS without BOS"
            files.append(bytes(cur))
            cur = None
        else:
            assert 0 <= v < 256
            cur.append(v)
    assert cur is None, "stream does not end with EOS"
    return files


def test_special_tokens():
    assert (BOS, EOS, PAD, VOCAB_SIZE_MIN) == (256, 257, 258, 259)


def test_streams_are_bos_bytes_eos_of_each_file():
    c = load_corpus(SMALL)
    root = Path(c.root)
    assert c.train.dtype == torch.int16 and c.val.dtype == torch.int16
    for stream, files in ((c.train, c.train_files), (c.val, c.val_files)):
        assert int(stream.min()) >= 0 and int(stream.max()) <= EOS  # PAD never occurs
        assert _split_streams(stream) == [(root / f).read_bytes() for f in files]
    assert c.num_files == 20
    assert c.num_bytes == sum((root / f).stat().st_size for f in c.train_files + c.val_files)
    assert c.train.numel() == c.train_bytes + 2 * len(c.train_files)
    assert c.val.numel() == c.val_bytes + 2 * len(c.val_files)


def test_file_selection_rules(tmp_path):
    """Fake stdlib tree: skipped dirs and generated files are left out; order is sorted relative path."""
    files = {
        "b.py": b"print('b')\n",
        "a.py": b"x = 1\n",
        "pkg/__init__.py": b"",
        "pkg/z.py": b"\xff\x00raw bytes\n",
        "pkg/test/test_x.py": b"skip",
        "tests/t.py": b"skip",
        "idlelib/idle_test/t.py": b"skip",
        "site-packages/third.py": b"skip",
        "__pycache__/a.cpython-311.py": b"skip",
        "config-3.11-x86_64-linux-gnu/python-config.py": b"skip",
        "_sysconfigdata__linux.py": b"skip",
        "notes.txt": b"skip",
    }
    for rel, data in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    assert list_source_files(tmp_path) == ["a.py", "b.py", "pkg/__init__.py", "pkg/z.py"]
    c = load_corpus(DataConfig(val_fraction=0.5, split_seed=3), root=tmp_path)
    assert sorted(c.train_files + c.val_files) == ["a.py", "b.py", "pkg/__init__.py", "pkg/z.py"]
    both = dict(zip(c.train_files, _split_streams(c.train))) | dict(zip(c.val_files, _split_streams(c.val)))
    assert both == {k: files[k] for k in both}
    assert c.num_bytes == sum(len(files[k]) for k in both)


def test_real_corpus_excludes_tests_and_third_party():
    rels = list_source_files()
    assert rels == sorted(rels) and len(rels) == len(set(rels))
    for rel in rels:
        parts = rel.split("/")
        assert not {"site-packages", "test", "tests", "idle_test", "__pycache__"} & set(parts[:-1]), rel
        assert rel.endswith(".py") and not parts[-1].startswith("_sysconfigdata_")
    assert "os.py" in rels and "json/decoder.py" in rels


def test_split_is_file_level_disjoint_and_follows_the_hash_rule():
    cfg = DataConfig(val_fraction=0.1, split_seed=7)
    c = load_corpus(cfg)
    train, val = set(c.train_files), set(c.val_files)
    assert not train & val
    assert train | val == set(list_source_files())
    for rel in c.train_files + c.val_files:  # recomputed here from the documented rule
        frac = int.from_bytes(hashlib.sha256(f"7:{rel}".encode()).digest()[:8], "big") / 2**64
        assert (rel in val) == (frac < 0.1), rel
    assert 0.05 < len(val) / c.num_files < 0.15


def test_split_is_stable_under_caps_and_reloads_and_changes_with_seed():
    full = load_corpus(DataConfig())
    capped = load_corpus(DataConfig(max_files=200))
    assert set(capped.val_files) == set(full.val_files) & set(capped.train_files + capped.val_files)
    clear_memory_cache()
    again = load_corpus(DataConfig())
    assert again is not full
    assert again.val_files == full.val_files and torch.equal(again.val, full.val)
    assert torch.equal(again.train, full.train)
    other = load_corpus(DataConfig(split_seed=1))
    assert other.val_files != full.val_files


def test_tiny_cap_keeps_both_splits_non_empty():
    c = load_corpus(DataConfig(max_files=2, val_fraction=0.001))
    assert len(c.train_files) == 1 and len(c.val_files) == 1


def test_uncapped_corpus_is_larger_than_1mb():
    c = load_corpus(DataConfig())
    d = c.describe()
    print(f"\nstdlib corpus: {d}")
    assert c.num_bytes > 1_000_000
    assert d["train_bytes"] > d["val_bytes"] > 0
    assert d["num_files"] == len(list_source_files(stdlib_root()))


def test_disk_cache_round_trip(tmp_path):
    cfg = DataConfig(max_files=15, split_seed=5)
    clear_memory_cache()
    first = load_corpus(cfg, cache_dir=tmp_path)
    assert not first.from_disk_cache
    written = list(tmp_path.glob("stdlib-py*-seed5-*.npz"))
    assert len(written) == 1
    clear_memory_cache()
    second = load_corpus(cfg, cache_dir=tmp_path)
    assert second.from_disk_cache
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert (first.train_files, first.val_files) == (second.train_files, second.val_files)
    assert first.describe() | {"from_disk_cache": True} == second.describe()
    clear_memory_cache()


# --------------------------------------------------------------------------------------------- batches


def test_batch_shapes_dtype_and_range():
    c = load_corpus(SMALL)
    x, y = BatchLoader(c, batch_size=6, seq_len=32, seed=0).batch(0)
    assert x.shape == y.shape == (6, 32)
    assert x.dtype == y.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < VOCAB_SIZE_MIN
    assert int(y.min()) >= 0 and int(y.max()) < VOCAB_SIZE_MIN


def test_targets_are_inputs_shifted_by_one():
    c = load_corpus(SMALL)
    loader = BatchLoader(c, batch_size=8, seq_len=48, seed=1)
    x, y = loader.batch(4)
    assert torch.equal(x[:, 1:], y[:, :-1])
    stream = c.train.long()
    for row, off in enumerate(loader.offsets(4).tolist()):
        assert torch.equal(x[row], stream[off : off + 48])
        assert torch.equal(y[row], stream[off + 1 : off + 49])


def test_batches_are_a_pure_function_of_seed_and_step():
    c = load_corpus(SMALL)
    a = BatchLoader(c, batch_size=4, seq_len=16, seed=11)
    b = BatchLoader(c, batch_size=4, seq_len=16, seed=11)
    b.batch(0), b.batch(9)  # order of calls must not matter
    for step in (0, 3, 1000):
        assert all(torch.equal(u, v) for u, v in zip(a.batch(step), b.batch(step)))
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    assert not torch.equal(a.batch(0)[0], BatchLoader(c, batch_size=4, seq_len=16, seed=12).batch(0)[0])
    it = iter(a)
    assert torch.equal(next(it)[0], a.batch(0)[0]) and torch.equal(next(it)[0], a.batch(1)[0])


def test_rows_slice_equals_slice_of_global_batch():
    c = load_corpus(SMALL)
    loader = BatchLoader(c, batch_size=8, seq_len=24, seed=2)
    x, y = loader.batch(7)
    for rows in (slice(0, 4), slice(4, 8), slice(2, 3), slice(1, None, 2)):
        xs, ys = loader.batch(7, rows=rows)
        assert torch.equal(xs, x[rows]) and torch.equal(ys, y[rows])
    # two data-parallel workers together see exactly the global batch
    parts = [loader.batch(7, rows=slice(w * 4, (w + 1) * 4)) for w in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    with pytest.raises(TypeError):
        loader.batch(7, rows=3)


def test_val_batches_fixed_and_from_the_val_split():
    c = load_corpus(SMALL)
    v1 = BatchLoader(c, batch_size=4, seq_len=16, seed=0).val_batches(3)
    v2 = BatchLoader(c, batch_size=4, seq_len=16, seed=99).val_batches(3)
    v3 = val_batches(c, 3, 4, 16)
    assert len(v1) == 3
    for (a, b), (p, q), (r, s) in zip(v1, v2, v3):
        assert a.shape == (4, 16) and torch.equal(a, p) and torch.equal(a, r)
        assert torch.equal(b, q) and torch.equal(b, s) and torch.equal(a[:, 1:], b[:, :-1])
    assert not torch.equal(v1[0][0], v1[1][0])
    val_raw = c.val.numpy().tobytes()
    for row in v1[0][0]:
        pos = val_raw.find(row.to(torch.int16).numpy().tobytes())
        assert pos >= 0 and pos % 2 == 0
    assert val_batches(c, 2, 2, 8)[0][0].shape == (2, 8)


def test_seq_len_longer_than_split_is_rejected():
    c = load_corpus(DataConfig(max_files=2))
    with pytest.raises(ValueError, match="seq_len"):
        BatchLoader(c, batch_size=2, seq_len=c.train.numel() + 5)
