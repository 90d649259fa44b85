"""Generation through the loss of the router worker that holds the caches: the backend moves to another worker,
rebuilds the running rows there from their token histories, and the greedy tokens equal the in-process engine's
(runtime/generation_backend.py); the lost worker is restarted and repaired by the cluster's heal."""

from __future__ import annotations

import os
import signal

from moe_runtime.generation.backend import LocalBackend
from moe_runtime.generation.byte_tokenizer import ByteTokenizer
from moe_runtime.generation.engine import Engine, encode_prompts
from moe_runtime.generation.sampling import SamplingParams
from moe_runtime.model.transformer import build_model

PROMPTS = ["def __init__(self", "import", "x = [1, 2"]


def test_generation_survives_losing_the_caches_worker(fresh4):
    c = fresh4
    assert len(c.workers) >= 2
    tok = ByteTokenizer()
    ids = encode_prompts(PROMPTS, tok)
    greedy = SamplingParams(max_new_tokens=12, temperature=0, ignore_eod=True)
    local = Engine(LocalBackend(build_model(c.cfg.model, c.cfg.train.seed).eval()), tok, ByteTokenizer.eod_id)
    want = [x.new_token_ids for x in local.generate(ids, greedy)]
    engine = c.generation_engine()
    pid = c.worker_pids[0]
    seen: list[int] = []

    def kill_mid_stream(event) -> None:
        seen.append(event.token_id)
        if len(seen) == 3 * 4:  # after 4 tokens of each prompt: the caches' worker dies between two steps
            os.kill(pid, signal.SIGKILL)

    try:
        got = [x.new_token_ids for x in engine.generate(ids, greedy, kill_mid_stream)]
        assert got == want
        assert engine.backend.failovers == 1 and engine.backend.worker is c.workers[1]
    finally:
        c.wait_healed()
        c.heal()  # Ray restarted worker 0: it gets a survivor's dense state back
    assert c.status()["healthy"]
    again = [x.new_token_ids for x in c.generate(PROMPTS, greedy)]  # on worker 0 again, repaired
    assert again == want
