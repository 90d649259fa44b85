"""Cached generation through the cluster (RemoteBackend over a router worker, experts on the actors) against
the in-process engine on the same weights: logits, greedy and seeded tokens, continuous batching, no leaks."""

from __future__ import annotations

import ray
from torch.testing import assert_close

from moe_runtime.generation.backend import LocalBackend
from moe_runtime.generation.byte_tokenizer import ByteTokenizer
from moe_runtime.generation.engine import BatchState, Engine, Request
from moe_runtime.generation.sampling import SamplingParams
from moe_runtime.model.transformer import build_model
from moe_runtime.runtime.generation_backend import RemoteBackend

PROMPTS = ["def __init__(self", "import", "x = [1, 2"]


def _local_engine(cluster) -> Engine:
    model = build_model(cluster.cfg.model, cluster.cfg.train.seed).eval()
    return Engine(LocalBackend(model), ByteTokenizer(), ByteTokenizer.eod_id)


def _actor_stats(cluster) -> list[dict]:
    return ray.get([a.stats.remote() for a in cluster.experts], timeout=30)


def test_cluster_logits_equal_in_process_through_keep_and_join(fresh4):
    cfg = fresh4.cfg
    local = LocalBackend(build_model(cfg.model, cfg.train.seed).eval())
    remote = RemoteBackend(fresh4.workers[0], cfg.model)
    tok = ByteTokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    lc, ll = local.prefill(prompts, 16)
    rc, rl = remote.prefill(prompts, 16)
    assert_close(rl, ll, rtol=1e-4, atol=1e-4)
    for tokens in ([65, 66, 67], [68, 69, 70]):
        assert_close(remote.decode(rc, tokens), local.decode(lc, tokens), rtol=1e-4, atol=1e-4)
    lc, rc = local.keep(lc, [2, 0]), remote.keep(rc, [2, 0])
    ln, ll = local.prefill([tok.encode("new")], 8)
    rn, rl = remote.prefill([tok.encode("new")], 8)
    assert_close(rl, ll, rtol=1e-4, atol=1e-4)
    lc, rc = local.join(lc, ln), remote.join(rc, rn)
    for tokens in ([71, 72, 73], [74, 75, 76]):
        assert_close(remote.decode(rc, tokens), local.decode(lc, tokens), rtol=1e-4, atol=1e-4)
    assert remote.stats()["rows"] == 3
    assert remote.keep(rc, []) is None
    assert remote.stats() ["caches"] == 0  # the free was queued before this call: actor calls run in order


def test_cluster_generate_equals_in_process_greedy_and_seeded(fresh4):
    local = _local_engine(fresh4)
    tok = ByteTokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    greedy = SamplingParams(max_new_tokens=12, temperature=0, ignore_eod=True)
    seeded = [SamplingParams(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=s, ignore_eod=True)
              for s in (1, 2, 3)]
    before = _actor_stats(fresh4)
    streamed = []
    on_cluster = fresh4.generate(PROMPTS, greedy, on_event=streamed.append)
    after = _actor_stats(fresh4)
    in_process = local.generate(ids, greedy)
    assert [c.new_token_ids for c in on_cluster] == [c.new_token_ids for c in in_process]
    assert all(len(c.new_token_ids) == 12 for c in on_cluster)
    assert len(streamed) == 3 * 12 and [e.request_id for e in streamed[:3]] == ["0", "1", "2"]
    # one frame per actor per MoE layer per forward (1 prefill + 11 decode steps), whatever the batch of 3;
    # and the servers kept no activations for inference
    forwards, layers = 12, fresh4.cfg.model.num_layers
    for b, a in zip(before, after):
        assert a["requests"]["dispatch"] - b["requests"]["dispatch"] <= forwards * layers
        assert a["requests"]["backward"] == b["requests"]["backward"]
        assert a["saved_entries"] == 0
    assert [c.new_token_ids for c in fresh4.generate(PROMPTS, seeded)] == \
        [c.new_token_ids for c in local.generate(ids, seeded)]


def test_cluster_continuous_batching_equals_in_process(fresh4):
    """Requests joining a running batch between steps, one finishing early, one aborted: the same tokens as
    in process, and the worker holds no cache afterwards."""
    tok = ByteTokenizer()
    engines = {"cluster": fresh4.generation_engine(), "local": _local_engine(fresh4)}
    out = {}
    for name, engine in engines.items():
        state, tokens = BatchState(), {}
        events = engine.add(state, [Request("a", tok.encode("abc"), SamplingParams(8, temperature=0, ignore_eod=True)),
                                    Request("b", tok.encode("q"), SamplingParams(3, temperature=0, ignore_eod=True))])
        for step in range(10):
            if step == 2:
                events += engine.add(state, [Request("c", tok.encode("hello"),
                                                     SamplingParams(6, temperature=0.8, seed=7, ignore_eod=True)),
                                             Request("d", tok.encode("zz"), SamplingParams(20, temperature=0))])
            if step == 4:
                engine.abort(state, ["d"])
            events += engine.step(state)
        assert not state.sequences and state.cache is None
        for e in events:
            tokens.setdefault(e.request_id, []).append(e.token_id)
        out[name] = tokens
    assert out["cluster"] == out["local"]
    assert [len(out["local"][r]) for r in "abc"] == [8, 3, 6]
    stats = engines["cluster"].backend.stats()
    assert stats["caches"] == 0 and stats["rows"] == 0


def test_completions_server_over_the_cluster(fresh4):
    """The HTTP server over the cluster's engine: concurrent clients share the batch and get the in-process
    tokens; a streamed request ends with [DONE]; afterwards the worker holds no cache."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from moe_runtime.serving import BackgroundServer

    engine = fresh4.generation_engine()
    tok = ByteTokenizer()
    with BackgroundServer(engine, model_name="tiny") as server:
        url = server.url + "/v1/completions"
        bodies = [{"prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": True} for p in PROMPTS]
        with ThreadPoolExecutor(len(bodies)) as pool:
            replies = list(pool.map(lambda b: requests.post(url, json=b, timeout=120), bodies))
        want = _local_engine(fresh4).generate([tok.encode(p) for p in PROMPTS],
                                              SamplingParams(10, temperature=0, ignore_eod=True))
        assert [r.json()["choices"][0]["token_ids"] for r in replies] == [c.new_token_ids for c in want]
        with requests.post(url, json={**bodies[0], "stream": True}, stream=True, timeout=120) as r:
            lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln]
        assert lines[-1] == "data: [DONE]"
        assert [json.loads(ln[6:])["choices"][0]["token_ids"][0] for ln in lines[:-1]] == want[0].new_token_ids
    stats = engine.backend.stats()
    assert stats["caches"] == 0 and stats["rows"] == 0
