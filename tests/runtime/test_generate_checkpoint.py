"""`moe-runtime generate --checkpoint DIR --token-ids ... --max-new-tokens 8 --temperature 0 --json` (in process
and on a local cluster started for the call) gives the greedy tokens of the float64 transcription of the official
forward on a checkpoint in the released layout (tests/checkpoint/official.py), stopping at its end-of-document
token as HF `generate` does; seeded sampling draws the same tokens from the official logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moe_runtime.checkpoint.run_config import load_run_config
from moe_runtime.checkpoint.text import tokenizer_for
from moe_runtime.cli import app
from moe_runtime.generation.sampling import SamplingParams, request_generator, sample_token
from tests.checkpoint.official import official_forward
from tests.runtime.hf_fixtures import make_checkpoint

IDS = [5, 17, 42, 7]
NEW = 8
HOT = 8.0  # a temperature at which the random model does not just repeat its last token


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gen") / "ck", dtype=torch.bfloat16, shards=2)


@pytest.fixture
def no_daemon(tmp_path, monkeypatch):
    from moe_runtime.runtime import session

    monkeypatch.setattr(session, "STATE_DIR", tmp_path / "state")  # no cluster is up: one is started per call


def _official(directory: Path, cfg: dict, weights: dict, seed: int | None = None) -> list[int]:
    """Greedy tokens (seed None), or tokens drawn with the engine's sampler and a generator seeded like the CLI's
    (the random tiny model's greedy continuation repeats the last token: sampling checks every step's logits)."""
    eod = tokenizer_for(load_run_config("cluster/local.yaml", directory).model).eod_id
    params = SamplingParams(NEW, temperature=0 if seed is None else HOT, seed=seed)
    gen = request_generator(params)
    ids, new = list(IDS), []
    for _ in range(NEW):
        nxt = sample_token(official_forward(cfg, weights, torch.tensor([ids]))[0][0, -1].float(), params, gen)
        new.append(nxt)
        if nxt == eod:
            break
        ids.append(nxt)
    return new


def _generate(args: list[str], seed: int | None = None) -> dict:
    sampling = ["--temperature", "0"] if seed is None else ["--temperature", str(HOT), "--seed", str(seed)]
    r = CliRunner().invoke(app, ["generate", *args, "--token-ids", ",".join(map(str, IDS)), "--max-new-tokens",
                                 str(NEW), *sampling, "--json"])
    assert r.exit_code == 0, (r.stdout + r.stderr)[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_generate_in_process_equals_the_official_greedy(ck, no_daemon) -> None:
    directory, cfg, weights = ck
    out = _generate(["--checkpoint", str(directory), "--in-process"])
    assert out["new_token_ids"] == [_official(directory, cfg, weights)]
    sampled = _generate(["--checkpoint", str(directory), "--in-process"], seed=3)
    assert sampled["new_token_ids"] == [_official(directory, cfg, weights, seed=3)]
    assert len(set(sampled["new_token_ids"][0])) > 1


@pytest.mark.slow  # starts its own cluster for the call (~40 s here)
def test_generate_on_a_cluster_equals_the_official_greedy(ray_session, ck, no_daemon, tmp_path) -> None:
    directory, cfg, weights = ck
    small = tmp_path / "c.yaml"
    small.write_text("cluster: {num_gpus: 0, gpus_per_expert_actor: 0, expert_actors: 2, router_workers: 1}\n"
                     "train: {batch_size: 2, seq_len: 16}\n")
    out = _generate(["--checkpoint", str(directory), "--config", str(small)], seed=3)
    assert out["new_token_ids"] == [_official(directory, cfg, weights, seed=3)]
