"""The completions server against a real HTTP client on loopback: concurrent requests share the batch and get
the engine's tokens, streaming (SSE) gives the same tokens, bad bodies get a 400 naming the field, a client that
drops mid-stream is aborted (its cache rows freed) and the server keeps serving."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from moe_runtime.config import ModelConfig
from moe_runtime.generation.backend import LocalBackend
from moe_runtime.generation.byte_tokenizer import ByteTokenizer
from moe_runtime.generation.engine import Engine
from moe_runtime.generation.sampling import SamplingParams
from moe_runtime.model.transformer import build_model
from moe_runtime.serving import BackgroundServer, BadRequest, parse_completion_request

CFG = ModelConfig(preset="tiny", max_seq_len=1024)


def _engine() -> Engine:
    return Engine(LocalBackend(build_model(CFG, seed=0).eval()), ByteTokenizer(), ByteTokenizer.eod_id)


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(_engine(), model_name="tiny") as s:
        yield s


def _post(server, body, **kw):
    return requests.post(server.url + "/v1/completions", json=body, timeout=60, **kw)


def _wait_idle(server, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        h = requests.get(server.url + "/health", timeout=10).json()
        if h["running"] == 0 and server.engine_loop._state.cache is None:
            return h
        time.sleep(0.05)
    raise AssertionError(f"server not idle after {timeout_s} s: {h}")


def test_concurrent_requests_share_the_batch_and_match_the_engine(server):
    prompts = [f"def f{i}(x" for i in range(8)]
    bodies = [{"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True} for p in prompts[:4]]
    bodies += [{"prompt": p, "max_tokens": 24, "temperature": 0.8, "top_k": 50, "seed": i, "ignore_eos": True}
               for i, p in enumerate(prompts[4:])]
    server.engine_loop.stats.max_batch = 0
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda b: _post(server, b), bodies))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    tok = ByteTokenizer()
    params = [SamplingParams(24, temperature=0, ignore_eod=True)] * 4 + [
        SamplingParams(24, temperature=0.8, top_k=50, seed=i, ignore_eod=True) for i in range(4)]
    expected = _engine().generate([tok.encode(p) for p in prompts], params)
    for r, want in zip(replies, expected):
        body = r.json()
        choice = body["choices"][0]
        assert choice["token_ids"] == want.new_token_ids and choice["text"] == want.text
        assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 24
        assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert server.engine_loop.stats.max_batch >= 2  # requests ran together in one batch
    _wait_idle(server)


def test_streaming_gives_the_same_tokens(server):
    body = {"prompt": "import os", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    whole = _post(server, body).json()["choices"][0]
    with _post(server, {**body, "stream": True}, stream=True) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    assert [c["choices"][0]["token_ids"][0] for c in chunks] == whole["token_ids"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_several_prompts_in_one_request(server):
    r = _post(server, {"prompt": [[256, 100], "ab"], "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1] and all(len(c["token_ids"]) == 5 for c in choices)


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": 7}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
    ({"prompt": [5, 99999]}, "prompt"),
    ({"prompt": [1] * 1024}, "prompt"),
])
def test_malformed_requests_get_a_400_naming_the_field(server, body, param):
    r = _post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_invalid_json_is_a_400(server):
    r = requests.post(server.url + "/v1/completions", data=b"{not json", timeout=10,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"


def test_parse_names_the_field():
    with pytest.raises(BadRequest) as e:
        parse_completion_request({"prompt": "x", "top_k": -2})
    assert e.value.param == "top_k" and "-2" in str(e.value)


def test_a_dropped_client_is_aborted_and_the_server_keeps_serving(server):
    aborted = server.engine_loop.stats.aborted
    body = json.dumps({"prompt": "long", "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True})
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        got = b""
        while got.count(b"data: ") < 3:
            got += sock.recv(4096)
        assert b"200 OK" in got
    h = _wait_idle(server)
    assert h["aborted"] == aborted + 1
    assert server.engine_loop._state.sequences == [] and server.engine_loop._sinks == {}
    r = _post(server, {"prompt": "still there", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) >= 1


class ScheduledMaskBackend(LocalBackend):
    """In process, what the cluster's backend (runtime/cluster_mask.ReportingBackend) tells the loop: the forwards
    numbered in `masked_forwards` run with experts 4, 5 of layer 0 masked, and `last_masked` says so."""

    MASKED = [[0, 4], [0, 5]]

    def __init__(self, model, masked_forwards: set[int]):
        super().__init__(model)
        self.masked_forwards, self.last_masked = masked_forwards, []

    def _mask_this_forward(self) -> None:
        masked = self.forwards in self.masked_forwards
        router = self.model.moe_layers[0].router
        router.set_expert_alive([e not in (4, 5) for e in range(router.num_experts)] if masked else None)
        self.last_masked = self.MASKED if masked else []

    def prefill(self, prompts, capacity):
        self._mask_this_forward()
        return super().prefill(prompts, capacity)

    def decode(self, cache, tokens):
        self._mask_this_forward()
        return super().decode(cache, tokens)


def _strong_model():
    """The tiny model with its experts' weights x10, so that masking two experts changes the greedy tokens."""
    model = build_model(CFG, seed=0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name:
                p.mul_(10.0)
    return model


def test_degraded_per_chunk_and_per_response():
    """Forwards 3 and 4 run masked: the chunks of tokens 3.. of a stream say so (a token depends on the cache of
    the steps before it), the tokens are those of the same masked steps in process; a request after it: []."""
    def engine(masked_forwards=frozenset({3, 4})):
        return Engine(ScheduledMaskBackend(_strong_model(), set(masked_forwards)), ByteTokenizer(),
                      ByteTokenizer.eod_id)  # fmt: skip

    body = {"prompt": "import os", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with BackgroundServer(engine(), model_name="tiny") as s:
        with _post(s, {**body, "stream": True}, stream=True) as r:
            lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln]
        chunks = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
        after = _post(s, {**body, "prompt": ["abc", [256, 98]]}).json()  # forwards 8..: unmasked
    masked = ScheduledMaskBackend.MASKED
    assert [c["degraded"] for c in chunks] == [[]] * 3 + [masked] * 5
    assert [c["choices"][0]["degraded"] for c in chunks] == [c["degraded"] for c in chunks]
    params = SamplingParams(8, temperature=0, ignore_eod=True)
    want = engine().generate([ByteTokenizer().encode("import os")], params)[0]
    unmasked = engine(frozenset()).generate([ByteTokenizer().encode("import os")], params)[0]
    assert [c["choices"][0]["token_ids"][0] for c in chunks] == want.new_token_ids
    assert want.new_token_ids[:3] == unmasked.new_token_ids[:3]
    assert want.new_token_ids != unmasked.new_token_ids  # the masked steps changed the tokens: the check can fail
    assert after["degraded"] == [] and [c["degraded"] for c in after["choices"]] == [[], []]


def test_a_response_is_degraded_when_any_of_its_choices_is():
    """Two prompts admitted in one prefill, forwards 0-2 masked: both choices and the response say so, and /health
    the last step's mask; the next request (forwards 3-5, unmasked): [] everywhere."""
    engine = Engine(ScheduledMaskBackend(_strong_model(), {0, 1, 2}), ByteTokenizer(), ByteTokenizer.eod_id)
    body = {"prompt": ["ab", "cd"], "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    with BackgroundServer(engine, model_name="tiny") as s:
        r = _post(s, body).json()
        health = requests.get(s.url + "/health", timeout=10).json()
        again = _post(s, body).json()
        health_again = requests.get(s.url + "/health", timeout=10).json()
    assert r["degraded"] == ScheduledMaskBackend.MASKED and health["degraded"] == ScheduledMaskBackend.MASKED
    assert [c["degraded"] for c in r["choices"]] == [ScheduledMaskBackend.MASKED] * 2
    assert again["degraded"] == [] and [c["degraded"] for c in again["choices"]] == [[], []]
    assert health_again["degraded"] == [] and health_again["status"] == "ok"
