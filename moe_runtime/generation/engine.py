"""The generation engine: prefill, one-token decode steps over a running batch, sampling and stopping.

Continuous batching: the caller holds a `BatchState` and alternates `add(state, requests)` (prefill the new
requests, sample their first token, join them to the running rows) and `step(state)` (one decode step for every
running row: one forward of one token per row, so each MoE layer gets all rows' tokens in one call). Finished
rows leave the batch after the step that finished them. `generate` and `stream` run that loop to the end.

A request stops on the end-of-document token (unless `ignore_eod`), on one of its stop tokens or stop strings
(finish_reason "stop"), or after max_new_tokens or at the model's max_seq_len (finish_reason "length"). Stop
tokens stay in new_token_ids but not in the text; the text ends before a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from moe_runtime.generation.backend import DecodeBackend
from moe_runtime.generation.sampling import SamplingParams, request_generator, sample_token
from moe_runtime.generation.stopping import INCOMPLETE, find_stop, streamable_length


class Detokenizer(Protocol):
    """What the engine needs for text and stop strings (ByteTokenizer, the checkpoint's SentencePieceTokenizer)."""

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams = SamplingParams()

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))


@dataclass(frozen=True)
class Completion:
    request_id: str
    prompt_ids: tuple[int, ...]
    new_token_ids: list[int]
    text: str  # the new tokens' text ("" without a detokenizer)
    finish_reason: str  # "stop" | "length"
    stop_reason: int | str | None  # the stop token or stop string; None for "length"


@dataclass(frozen=True)
class TokenEvent:
    """One new token of one request; `completion` is set on the request's last event."""

    request_id: str
    token_id: int
    text_delta: str  # text that became final with this token (held back: partial characters, stop prefixes)
    completion: Completion | None = None

    @property
    def finish_reason(self) -> str | None:
        return None if self.completion is None else self.completion.finish_reason


@dataclass(eq=False)
class _Sequence:
    request: Request
    generator: torch.Generator | None
    new_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    searched: int = 0  # characters of text searched for stop strings
    streamed: int = 0  # characters of text sent in events
    completion: Completion | None = None


@dataclass(eq=False)
class BatchState:
    """The running batch: its sequences and the backend's cache for them (cache rows in the same order)."""

    sequences: list[_Sequence] = field(default_factory=list)
    cache: Any = None

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def request_ids(self) -> list[str]:
        return [s.request.request_id for s in self.sequences]


class Engine:
    """Generation over a DecodeBackend. Not thread-safe: one loop drives add/step."""

    def __init__(self, backend: DecodeBackend, tokenizer: Detokenizer | None = None, eod_id: int | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.eod_id = eod_id

    # ------------------------------------------------------------------ continuous batching

    def add(self, state: BatchState, requests: Sequence[Request]) -> list[TokenEvent]:
        """Prefill `requests`, sample their first tokens and add the unfinished ones to the running batch."""
        if not requests:
            return []
        self._check(state, requests)
        capacity = max(len(r.prompt_ids) + r.params.max_new_tokens - 1 for r in requests)
        cache, logits_nv = self.backend.prefill([r.prompt_ids for r in requests], capacity)
        seqs = [_Sequence(r, request_generator(r.params)) for r in requests]
        events = self._accept(seqs, logits_nv)
        running = [i for i, s in enumerate(seqs) if s.completion is None]
        cache = self.backend.keep(cache, running) if len(running) < len(seqs) else cache
        if running:
            state.cache = cache if state.cache is None else self.backend.join(state.cache, cache)
            state.sequences += [seqs[i] for i in running]
        return events

    def step(self, state: BatchState) -> list[TokenEvent]:
        """One decode step: every running row's last token through the model, one new token per row."""
        if not state.sequences:
            return []
        logits_bv = self.backend.decode(state.cache, [s.new_token_ids[-1] for s in state.sequences])
        events = self._accept(state.sequences, logits_bv)
        self._drop(state, [s.completion is not None for s in state.sequences])
        return events

    def abort(self, state: BatchState, request_ids: Sequence[str]) -> None:
        """Remove requests from the running batch (e.g. their client went away); unknown ids are ignored."""
        gone = set(request_ids)
        self._drop(state, [s.request.request_id in gone for s in state.sequences])

    def validate(self, requests: Sequence[Request]) -> None:
        """Raise ValueError (naming the request and the field) for requests `add` would refuse on an empty batch."""
        self._check(BatchState(), requests)

    # ------------------------------------------------------------------ whole runs

    def stream(self, requests: Sequence[Request]) -> Iterator[TokenEvent]:
        """Every request's tokens as they come (all requests start together)."""
        state = BatchState()
        yield from self.add(state, requests)
        while state.sequences:
            yield from self.step(state)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        on_event: Callable[[TokenEvent], None] | None = None,
    ) -> list[Completion]:
        """Completions of the prompts, in order (request ids "0", "1", ...); on_event sees every token as it
        comes (streaming to a terminal)."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} sampling params for {len(prompts)} prompts")
        requests = [Request(str(i), tuple(p), sp) for i, (p, sp) in enumerate(zip(prompts, per_prompt))]
        done = {}
        for e in self.stream(requests):
            if on_event is not None:
                on_event(e)
            if e.completion is not None:
                done[e.request_id] = e.completion
        return [done[r.request_id] for r in requests]

    # ------------------------------------------------------------------ internals

    def _check(self, state: BatchState, requests: Sequence[Request]) -> None:
        ids = [r.request_id for r in requests]
        clash = set(ids) & set(state.request_ids)
        if clash or len(set(ids)) != len(ids):
            raise ValueError(f"request ids {sorted(clash) or ids}: must be unique among running requests")
        vocab, max_len = self.backend.vocab_size, self.backend.max_seq_len
        for r in requests:
            n = len(r.prompt_ids)
            if n == 0:
                raise ValueError(f"request {r.request_id}: empty prompt (expected at least one token)")
            if n >= max_len:
                raise ValueError(f"request {r.request_id}: prompt of {n} tokens leaves no room under "
                                 f"max_seq_len {max_len}")
            bad = [t for t in r.prompt_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"request {r.request_id}: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
            if r.params.stop and self.tokenizer is None:
                raise ValueError(f"request {r.request_id}: stop strings need a detokenizer (none given)")

    def _accept(self, seqs: Sequence[_Sequence], logits_bv: torch.Tensor) -> list[TokenEvent]:
        if all(s.request.params.greedy for s in seqs):  # one argmax for the batch (first maximum, as per row)
            return [self._append(s, t) for s, t in zip(seqs, logits_bv.argmax(-1).tolist())]
        return [self._append(s, sample_token(logits_bv[i], s.request.params, s.generator))
                for i, s in enumerate(seqs)]

    def _append(self, seq: _Sequence, token: int) -> TokenEvent:
        params = seq.request.params
        seq.new_token_ids.append(token)
        reason: int | str | None = None
        if token in params.stop_token_ids or (token == self.eod_id and not params.ignore_eod):
            reason = token
        if self.tokenizer is not None:  # a stop token's text stays out (a detokenizer may spell out specials)
            text = self.tokenizer.decode(seq.new_token_ids[:-1] if reason is not None else seq.new_token_ids)
            hit = None if reason is not None else find_stop(text, params.stop, seq.searched)
            seq.searched = len(text.rstrip(INCOMPLETE))  # a partial last character may still change
            if hit is not None:
                reason, text = hit[1], text[: hit[0]]
            seq.text = text
        finish = "stop" if reason is not None else None
        total = len(seq.request.prompt_ids) + len(seq.new_token_ids)
        if finish is None and (len(seq.new_token_ids) >= params.max_new_tokens or total >= self.backend.max_seq_len):
            finish = "length"
        visible = len(seq.text) if finish else max(seq.streamed, streamable_length(seq.text, params.stop))
        delta, seq.streamed = seq.text[seq.streamed : visible], visible
        if finish:
            seq.completion = Completion(seq.request.request_id, seq.request.prompt_ids, list(seq.new_token_ids),
                                        seq.text, finish, reason)
        return TokenEvent(seq.request.request_id, token, delta, seq.completion)

    def _drop(self, state: BatchState, gone: Sequence[bool]) -> None:
        if not any(gone):
            return
        keep = [i for i, g in enumerate(gone) if not g]
        state.cache = self.backend.keep(state.cache, keep)
        state.sequences = [state.sequences[i] for i in keep]


def encode_prompts(prompts: Sequence[str | Sequence[int]], tokenizer: Any) -> list[list[int]]:
    """Token ids of each prompt: text through the tokenizer (`encode(str) -> list[int]`), token ids as they are."""
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise ValueError(f"prompts[{i}] = '': expected at least one character")
            out.append(list(tokenizer.encode(p)))
        else:
            out.append([int(t) for t in p])
    return out
