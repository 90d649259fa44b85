"""The engine: greedy and seeded generation with caches equal full recompute; continuous batching; stopping."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.config import ModelConfig
from moe_runtime.data import EOS
from moe_runtime.generation.backend import LocalBackend, RecomputeBackend
from moe_runtime.generation.engine import BatchState, Engine, Request
from moe_runtime.generation.sampling import SamplingParams
from moe_runtime.generation.byte_tokenizer import ByteTokenizer
from moe_runtime.model.transformer import build_model

PROMPTS = [[256, 104, 101, 108, 108, 111], [256, 120], [256, 100, 101, 102, 32, 102, 40, 41, 58]]


@pytest.fixture(scope="module", params=[True, False], ids=["lfa", "plain"])
def model(request):
    return build_model(ModelConfig(preset="tiny", lfa=request.param), seed=0).eval()


def greedy_by_full_recompute(model, prompt: list[int], n: int) -> list[int]:
    """The reference: argmax after the whole sequence, recomputed from scratch for every token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_with_caches_equals_greedy_by_full_recompute(model):
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eod=True)
    cached = Engine(LocalBackend(model)).generate(PROMPTS, params)
    recomputed = Engine(RecomputeBackend(model)).generate(PROMPTS, params)
    for prompt, c, r in zip(PROMPTS, cached, recomputed):
        assert c.new_token_ids == r.new_token_ids == greedy_by_full_recompute(model, prompt, 12)
        assert c.finish_reason == "length" and c.stop_reason is None and c.prompt_ids == tuple(prompt)


def test_seeded_sampling_is_reproducible_and_equal_with_or_without_caches(model):
    params = [SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=s, ignore_eod=True)
              for s in (1, 2, 3)]
    first = Engine(LocalBackend(model)).generate(PROMPTS, params)
    again = Engine(LocalBackend(model)).generate(PROMPTS, params)
    recomputed = Engine(RecomputeBackend(model)).generate(PROMPTS, params)
    assert [c.new_token_ids for c in first] == [c.new_token_ids for c in again]
    assert [c.new_token_ids for c in first] == [c.new_token_ids for c in recomputed]
    # a request's draws come from its own generator: the same tokens alone as in the batch
    alone = Engine(LocalBackend(model)).generate(PROMPTS[1:2], params[1])
    assert alone[0].new_token_ids == first[1].new_token_ids
    other_seed = Engine(LocalBackend(model)).generate(PROMPTS[:1], params[1])
    assert other_seed[0].new_token_ids != first[0].new_token_ids


def test_requests_join_and_leave_the_running_batch_between_steps(model):
    engine = Engine(LocalBackend(model))
    greedy = lambda n: SamplingParams(max_new_tokens=n, temperature=0, ignore_eod=True)  # noqa: E731
    state = BatchState()
    tokens: dict[str, list[int]] = {}

    def run(events):
        for e in events:
            tokens.setdefault(e.request_id, []).append(e.token_id)

    run(engine.add(state, [Request("a", PROMPTS[0], greedy(9)), Request("b", PROMPTS[1], greedy(3))]))
    for _ in range(3):
        run(engine.step(state))
    assert state.request_ids == ["a"]  # b finished after its 3rd token and left
    run(engine.add(state, [Request("c", PROMPTS[2], greedy(6))]))
    assert state.request_ids == ["a", "c"] and state.cache.batch_size == 2
    while len(state):
        run(engine.step(state))
    assert state.cache is None
    for rid, prompt, n in (("a", PROMPTS[0], 9), ("b", PROMPTS[1], 3), ("c", PROMPTS[2], 6)):
        assert tokens[rid] == greedy_by_full_recompute(model, prompt, n), rid


def test_abort_removes_a_request_and_the_others_continue(model):
    engine = Engine(LocalBackend(model))
    state = BatchState()
    params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eod=True)
    engine.add(state, [Request("a", PROMPTS[0], params), Request("b", PROMPTS[1], params)])
    engine.abort(state, ["a", "unknown"])
    assert state.request_ids == ["b"]
    out = [e.token_id for _ in range(4) for e in engine.step(state)]
    assert out == greedy_by_full_recompute(model, PROMPTS[1], 5)[1:] and not len(state)


def test_invalid_requests_are_clear_errors(model):
    engine = Engine(LocalBackend(model))
    cases = [
        ([Request("a", [])], "empty prompt"),
        ([Request("a", [1, 999])], r"token ids \[999\] outside the vocabulary \[0, 264\)"),
        ([Request("a", [1] * 128)], "prompt of 128 tokens leaves no room under max_seq_len 128"),
        ([Request("a", [1]), Request("a", [2])], "must be unique"),
        ([Request("a", [1], SamplingParams(stop=("x",)))], "need a detokenizer"),
    ]
    for requests, match in cases:
        with pytest.raises(ValueError, match=match):
            engine.add(BatchState(), requests)


# ----------------------------------------------------------------------------------------------- stopping


class ScriptedBackend:
    """Greedy decoding of row r emits script[prompt][0], [1], ...: tests the engine's stopping on its own."""

    vocab_size = 264

    def __init__(self, scripts: dict[tuple[int, ...], list[int]], max_seq_len: int = 64):
        self.scripts, self.max_seq_len = scripts, max_seq_len

    def _logits(self, rows):
        out = torch.zeros(len(rows), self.vocab_size)
        for i, (script, n) in enumerate(rows):
            out[i, script[n]] = 1.0
        return out

    def prefill(self, prompts, capacity):
        rows = [[self.scripts[tuple(p)], 0] for p in prompts]
        return rows, self._logits(rows)

    def decode(self, cache, tokens):
        for row, t in zip(cache, tokens):
            assert t == row[0][row[1]]  # the engine feeds back what it sampled
            row[1] += 1
        return self._logits(cache)

    def keep(self, cache, rows):
        return [cache[i] for i in rows] or None

    def join(self, first, second):
        return first + second


def scripted(text: str) -> list[int]:
    return list(text.encode())


def run_scripted(script, params, max_seq_len=64):
    engine = Engine(ScriptedBackend({(1,): script}, max_seq_len), ByteTokenizer(), eod_id=EOS)
    events = list(engine.stream([Request("r", (1,), params)]))
    return events, events[-1].completion


def test_stop_on_the_end_of_document_token_unless_ignored():
    events, done = run_scripted(scripted("hi") + [EOS] + scripted("more"), SamplingParams(temperature=0))
    assert (done.new_token_ids, done.text, done.finish_reason, done.stop_reason) == (
        scripted("hi") + [EOS], "hi", "stop", EOS)
    assert [e.finish_reason for e in events] == [None, None, "stop"]
    _, done = run_scripted(scripted("hi") + [EOS] + scripted("more"),
                           SamplingParams(temperature=0, ignore_eod=True, max_new_tokens=5))
    assert (done.text, done.finish_reason) == ("himo", "length")


def test_stop_token_ids():
    _, done = run_scripted(scripted("abc"), SamplingParams(temperature=0, stop_token_ids=(ord("b"),)))
    assert (done.new_token_ids, done.text, done.stop_reason) == (scripted("ab"), "a", ord("b"))  # its text left out


def test_stop_string_ends_the_text_and_is_never_streamed():
    events, done = run_scripted(scripted("one two\nthree"), SamplingParams(temperature=0, stop=("\nth", "zz")))
    assert (done.text, done.finish_reason, done.stop_reason) == ("one two", "stop", "\nth")
    assert done.new_token_ids == scripted("one two\nth")  # the tokens that completed the stop string stay
    assert "".join(e.text_delta for e in events) == "one two"
    # the "\n" that could start the stop string was held back until the stop string completed
    assert [e.text_delta for e in events][-3:] == ["", "", ""]


def test_a_held_back_prefix_is_released_when_it_does_not_become_a_stop_string():
    events, done = run_scripted(scripted("a\nb"), SamplingParams(temperature=0, stop=("\nX",), max_new_tokens=3))
    assert [e.text_delta for e in events] == ["a", "", "\nb"]
    assert done.text == "a\nb" and done.finish_reason == "length"


def test_streamed_text_waits_for_complete_characters():
    events, done = run_scripted(scripted("é!"), SamplingParams(temperature=0, max_new_tokens=3))
    assert [e.text_delta for e in events] == ["", "é", "!"]
    assert done.text == "é!"


def test_length_stops_at_max_new_tokens_or_max_seq_len():
    _, done = run_scripted(scripted("abcdef"), SamplingParams(temperature=0, max_new_tokens=4))
    assert (done.text, done.finish_reason) == ("abcd", "length")
    _, done = run_scripted(scripted("abcdef"), SamplingParams(temperature=0, max_new_tokens=10), max_seq_len=4)
    assert (done.text, done.finish_reason) == ("abc", "length")  # prompt (1) + 3 new = max_seq_len


def test_one_token_requests_finish_at_prefill_and_never_join():
    engine = Engine(ScriptedBackend({(1,): scripted("ab"), (2,): scripted("cd")}))
    state = BatchState()
    events = engine.add(state, [Request("x", (1,), SamplingParams(max_new_tokens=1, temperature=0)),
                                Request("y", (2,), SamplingParams(max_new_tokens=2, temperature=0))])
    assert [e.finish_reason for e in events] == ["length", None]
    assert state.request_ids == ["y"] and len(state.cache) == 1
