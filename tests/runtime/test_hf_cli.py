"""`moe-runtime forward --checkpoint DIR --token-ids ... --json` (in process and on a local cluster started for the
call) against the float64 transcription of the official forward; `--text` through the checkpoint's tokenizer;
`export --checkpoint-out`; bad input named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moe_runtime.checkpoint.tokenizer import SentencePieceTokenizer
from moe_runtime.cli import app
from tests.checkpoint.official import official_forward, rel_err
from tests.runtime.hf_fixtures import make_checkpoint

TOL = 1e-4
IDS = [5, 17, 42]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli") / "ck", dtype=torch.bfloat16, shards=2)


@pytest.fixture
def no_daemon(tmp_path, monkeypatch):
    from moe_runtime.runtime import session

    monkeypatch.setattr(session, "STATE_DIR", tmp_path / "state")  # no cluster is up: one is started per call


@pytest.fixture
def small_cluster(tmp_path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("cluster: {num_gpus: 0, gpus_per_expert_actor: 0, expert_actors: 2, router_workers: 1}\n"
                    "train: {batch_size: 2, seq_len: 16}\n")
    return path


def _json(result) -> dict:
    assert result.exit_code == 0, (result.stdout + result.stderr)[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _check_logits(out: dict, cfg: dict, weights: dict) -> None:
    want = official_forward(cfg, weights, torch.tensor([IDS]))[0][0, -1]
    got = torch.tensor(out["last_logits"], dtype=torch.float64)
    assert got.shape == want.shape == (cfg["vocab_size"],)
    assert rel_err(got, want) < TOL
    top = [p["token"] for p in out["predictions"]]
    assert top == torch.topk(want, len(top)).indices.tolist()


def test_forward_in_process(ck, no_daemon) -> None:
    directory, cfg, weights = ck
    out = _json(CliRunner().invoke(app, ["forward", "--checkpoint", str(directory), "--token-ids", "5,17,42",
                                         "--in-process", "--json"]))
    assert out["token_ids"] == IDS
    _check_logits(out, cfg, weights)


def test_forward_on_a_cluster_started_for_the_call(ray_session, ck, no_daemon, small_cluster) -> None:
    directory, cfg, weights = ck
    out = _json(CliRunner().invoke(app, ["forward", "--checkpoint", str(directory), "--token-ids", "5,17,42",
                                         "--config", str(small_cluster), "--json"]))
    _check_logits(out, cfg, weights)


def test_text_goes_through_the_checkpoints_tokenizer(ck, no_daemon, tmp_path) -> None:
    directory, _, _ = ck
    text = "def greet(name):"
    out = _json(CliRunner().invoke(app, ["forward", "--checkpoint", str(directory), "--text", text, "--in-process",
                                         "--json"]))
    assert out["tokenizer"] == "sentencepiece"
    assert out["token_ids"] == SentencePieceTokenizer(directory / "tokenizer.model").encode(text)
    bare, _, _ = make_checkpoint(tmp_path / "bare", tokenizer=False)  # no tokenizer.model: bytes
    out = _json(CliRunner().invoke(app, ["forward", "--checkpoint", str(bare), "--text", "ab", "--in-process",
                                         "--json"]))
    assert out["tokenizer"] == "byte" and out["token_ids"] == [256, 97, 98]


@pytest.mark.slow
def test_export_command_writes_the_checkpoint_back(ray_session, ck, no_daemon, small_cluster, tmp_path) -> None:
    from safetensors.torch import load_file

    directory, _, weights = ck
    out_dir = tmp_path / "out"
    rep = _json(CliRunner().invoke(app, ["export", "--checkpoint", str(directory), "--checkpoint-out", str(out_dir),
                                         "--config", str(small_cluster), "--json"]))
    assert sorted(rep["parties"]) == ["actor 0", "actor 1", "worker 0"]
    stored = load_file(str(out_dir / "model.safetensors"))
    assert set(stored) == set(weights) - {"lm_head.weight"}
    assert all(torch.equal(stored[k], weights[k]) for k in stored)


@pytest.mark.parametrize("args,message", [
    (["--token-ids", "5,17,42", "--text", "x"], "exactly one of --text or --token-ids"),
    (["--token-ids", "5,x"], "comma-separated integers"),
    (["--token-ids", "5,400"], "token 400 is outside the vocabulary [0, 400)"),
])
def test_bad_forward_input_is_named(ck, no_daemon, args, message) -> None:
    result = CliRunner().invoke(app, ["forward", "--checkpoint", str(ck[0]), "--in-process", *args])
    assert result.exit_code == 2 and message in " ".join((result.stdout + result.stderr).split())


def test_a_config_that_contradicts_the_checkpoint_names_both_values(ck, no_daemon, tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: {num_experts: 8}\n")
    result = CliRunner().invoke(app, ["forward", "--checkpoint", str(ck[0]), "--config", str(path),
                                      "--token-ids", "1", "--in-process"])
    text = " ".join((result.stdout + result.stderr).split())
    assert result.exit_code == 2 and "model.num_experts = 8 contradicts num_experts = 4" in text
    path.write_text(f"model: {{checkpoint: {ck[0]}, top_k: 1}}\n")  # model.checkpoint in the file
    result = CliRunner().invoke(app, ["forward", "--config", str(path), "--token-ids", "1", "--in-process"])
    text = " ".join((result.stdout + result.stderr).split())
    assert result.exit_code == 2 and "model.top_k = 1 contradicts top_k = 2" in text


def test_training_a_small_vocabulary_on_the_byte_corpus_is_refused(no_daemon, tmp_path) -> None:
    directory, _, _ = make_checkpoint(tmp_path / "v80", tokenizer=False, vocab_size=80)
    result = CliRunner().invoke(app, ["train", "--checkpoint", str(directory), "--in-process", "--steps", "1"])
    text = " ".join((result.stdout + result.stderr).split())
    assert result.exit_code == 2 and "vocab_size is 80" in text


def test_an_unsupported_checkpoint_config_is_named(no_daemon, tmp_path) -> None:
    directory, _, _ = make_checkpoint(tmp_path / "shareqk", tokenizer=False, use_shareqk=True)
    result = CliRunner().invoke(app, ["forward", "--checkpoint", str(directory), "--token-ids", "1", "--in-process"])
    text = " ".join((result.stdout + result.stderr).split())
    assert result.exit_code == 2 and "use_shareqk = True" in text and "config.json" in text
