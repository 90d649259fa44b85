"""Mask mode end to end on a local cluster (2 expert actors, 2 router workers, top_p routing, so a row's answer
depends on the mask even when it chose no lost expert): the only replica's actor of some experts is SIGKILLed.
During the outage (the heal the serve path starts is held back by holding the cluster's heal lock) the
completions endpoint, over a real HTTP client on loopback, answers with the in-process masked model's tokens and
says which (layer, expert) pairs it was computed without, per response, per choice and per streamed chunk; a
forward whose rows are split over both workers equals the masked model in every row (one mask for the cluster,
runtime/cluster_mask.py); `forward --json` and `generate --json` report the same pairs. Once the lock is released
the heal the endpoint started brings the actor back and the endpoint answers unmasked, without a restart."""

from __future__ import annotations

import json
import os
import signal

import pytest
import requests
import torch
import yaml
from typer.testing import CliRunner

from moe_runtime.generation.backend import LocalBackend
from moe_runtime.generation.byte_tokenizer import ByteTokenizer
from moe_runtime.generation.engine import Engine
from moe_runtime.generation.sampling import SamplingParams
from moe_runtime.model.transformer import build_model
from tests.runtime.helpers import make_config, only_on
from tests.runtime.test_faults import _pid, _wait_dead

VICTIM = 1
PROMPTS = [[256, 100, 101, 102, 40], [256, 105, 109]]
MAX_TOKENS = 6
TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def cluster(ray_session, runtime_tmp):
    from moe_runtime.config import parse_config
    from moe_runtime.runtime.cluster import Cluster

    data = make_config(runtime_tmp / "mask_serving", train={"checkpoint_every": 0}, expert_actors=2,
                       router_workers=2).model_dump(mode="json")  # fmt: skip
    data["transport"]["on_expert_failure"] = "mask"
    # top_p: gates are the softmax over the live experts; init_std 0.3: the mask changes the greedy tokens
    data["model"].update(routing="top_p", top_p=0.3, k_max=2, init_std=0.3)
    c = Cluster.start(parse_config(data))
    c.checkpoint(runtime_tmp / "mask_serving" / "serve")  # of the current step: the lost shards come back from it
    yield c
    c.shutdown()


def _ref(c, masked=()):
    model = build_model(c.cfg.model, c.cfg.train.seed).eval()  # the cluster's weights (it has not trained)
    for layer, moe in enumerate(model.moe_layers):
        dead = {e for la, e in masked if la == layer}
        moe.router.set_expert_alive([e not in dead for e in range(moe.router.num_experts)] if dead else None)
    return model


def _greedy(model) -> list[list[int]]:
    tok = ByteTokenizer()
    params = SamplingParams(MAX_TOKENS, temperature=0, ignore_eod=True)
    return [c.new_token_ids for c in Engine(LocalBackend(model), tok, tok.eod_id).generate(PROMPTS, params)]


def _rows(c, lost) -> torch.Tensor:
    """[2, 3]: row 0 routes to a lost expert, row 1 (unmasked) to none: worker 1 alone would not mask."""
    ref, dead = _ref(c), {(la, e) for la, e in lost}
    g = torch.Generator().manual_seed(11)
    found: dict[bool, torch.Tensor] = {}
    with torch.no_grad():
        for _ in range(2000):
            row = torch.randint(0, 256, (1, 3), generator=g)
            ref(row)
            load = ref.expert_load()
            touches = any(load[la, e] > 0 for la, e in dead)
            found.setdefault(touches, row)
            if len(found) == 2:
                return torch.cat([found[True], found[False]])
    raise AssertionError("no row avoiding the lost experts in 2000 tries")


def _post(url, body, **kw):
    return requests.post(url + "/v1/completions", json=body, timeout=120, **kw)


def _complete(url) -> list[dict]:
    return [_post(url, {"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}).json()
            for p in PROMPTS]  # fmt: skip


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the references' small matmuls on a loaded 2-core machine
    yield
    torch.set_num_threads(threads)


def test_serving_through_a_lost_expert_says_degraded_then_heals(cluster, tmp_path, monkeypatch, one_thread):
    from moe_runtime.serving import BackgroundServer

    c = cluster
    lost = only_on(c, VICTIM)
    assert lost, "actor 1 must hold experts with no other replica"
    plain_tokens, masked_tokens = _greedy(_ref(c)), _greedy(_ref(c, lost))
    assert plain_tokens != masked_tokens  # the mask changes the answers: the comparisons below can fail
    rows = _rows(c, lost)
    with torch.no_grad():
        plain_rows, masked_rows = _ref(c)(rows).logits, _ref(c, lost)(rows).logits
    # init_std 0.3: logits of a few units, so cluster vs in-process agree to ~1e-5 absolute; the mask moves
    # row 1 (which chose no lost expert) by far more than the tolerance
    assert (plain_rows[1] - masked_rows[1]).abs().max() > 100 * TOL["atol"]

    with BackgroundServer(c.generation_engine(), model_name="tiny") as server:
        before = _complete(server.url)
        assert [r["choices"][0]["token_ids"] for r in before] == plain_tokens
        assert all(r["degraded"] == [] for r in before)

        victim = _pid(c.experts[VICTIM])
        with c._heal_lock:  # the outage lasts while we hold it: the heal the endpoint starts waits here
            os.kill(victim, signal.SIGKILL)
            _wait_dead(victim)
            during = _complete(server.url)
            assert [r["choices"][0]["token_ids"] for r in during] == masked_tokens
            assert all(r["degraded"] == lost and r["choices"][0]["degraded"] == lost for r in during)
            assert c._healer is not None and c._healer.is_alive()  # serving started the heal (waiting for us)
            body = {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            with _post(server.url, body, stream=True) as r:
                lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln]
            chunks = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
            assert [ch["choices"][0]["token_ids"][0] for ch in chunks] == masked_tokens[0]
            assert all(ch["degraded"] == lost for ch in chunks)

            # rows over both workers: one mask (worker 1's row alone would not meet the lost experts)
            torch.testing.assert_close(c.forward(rows), masked_rows, **TOL)
            assert c.last_degraded == lost

            # the CLI's --json on this cluster
            from moe_runtime.cli import app

            config = tmp_path / "run.yaml"
            config.write_text(yaml.safe_dump(c.cfg.model_dump(mode="json")))
            monkeypatch.setattr("moe_runtime.ops_cli.on_cluster", lambda cfg, fn: fn(c))  # this cluster, no daemon
            monkeypatch.setattr("moe_runtime.ops_cli.warn_fresh_cluster", lambda cfg: None)
            monkeypatch.setattr("moe_runtime.cli._same_model_as_daemon", lambda cfg: None)
            runner = CliRunner()
            fwd = runner.invoke(app, ["forward", "--token-ids", ",".join(map(str, PROMPTS[0])), "--config",
                                      str(config), "--json"])  # fmt: skip
            assert fwd.exit_code == 0, fwd.output
            out = json.loads(fwd.stdout.strip().splitlines()[-1])
            with torch.no_grad():
                want_last = _ref(c, lost)(torch.tensor([PROMPTS[0]])).logits[0, -1]
            torch.testing.assert_close(torch.tensor(out["last_logits"]), want_last, **TOL)
            assert out["degraded"] == lost
            gen = runner.invoke(app, ["generate", "--token-ids", ",".join(map(str, PROMPTS[1])), "--max-new-tokens",
                                      str(MAX_TOKENS), "--temperature", "0", "--config", str(config), "--json"])
            assert gen.exit_code == 0, gen.output
            out = json.loads(gen.stdout.strip().splitlines()[-1])
            assert out["new_token_ids"] == [masked_tokens[1]] and out["degraded"] == lost

        c.wait_healed(180)  # the endpoint's heal: the restarted actor reloads its shards from the checkpoint
        assert c.last_heal_error is None, c.last_heal_error
        status = c.status()
        assert status["healthy"] and status["degraded"] == [], [a["health"] for a in status["expert_actors"]]
        after = _complete(server.url)
        assert [r["choices"][0]["token_ids"] for r in after] == plain_tokens
        assert all(r["degraded"] == [] for r in after)
    torch.testing.assert_close(c.forward(rows), plain_rows, **TOL)
    assert c.last_degraded == []
