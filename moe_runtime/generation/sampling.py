"""Per-request sampling: greedy, temperature, top-k, top-p; one seeded CPU generator per request.

Order of the filters as in HF `generate` and vLLM: temperature, then top-k, then top-p, then a draw from the
softmax. Sampling runs on CPU float32 logits with the request's own generator, so a seed gives the same tokens
whatever device produced the logits and whatever other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops (the knobs of HF `generate` / vLLM SamplingParams)."""

    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (ties at the k-th included); 0 = no limit
    top_p: float = 1.0  # keep the fewest most likely tokens whose probabilities sum to >= top_p
    seed: int | None = None  # None: the process-wide torch RNG
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one that appears
    stop_token_ids: tuple[int, ...] = ()  # stop tokens besides the end-of-document token
    ignore_eod: bool = False  # keep generating past the end-of-document token

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {self.max_new_tokens}: expected at least 1")
        if not self.temperature >= 0:
            raise ValueError(f"temperature = {self.temperature}: expected >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k}: expected >= 0 (0 = no limit)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p}: expected in (0, 1]")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed = {self.seed}: expected a non-negative integer")
        if any(not s for s in self.stop):
            raise ValueError(f"stop = {list(self.stop)}: stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def request_generator(params: SamplingParams) -> torch.Generator | None:
    """The request's own CPU generator (None for greedy requests or without a seed)."""
    if params.greedy or params.seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(params.seed)


def filter_logits(logits_v: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Logits / temperature with the tokens outside top-k and top-p set to -inf (float32). temperature > 0."""
    logits = logits_v.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
        drop[0] = False  # the most likely token always stays
        logits = logits.scatter(0, order[drop], float("-inf"))
    return logits


def sample_token(logits_v: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits [V] (CPU) under params; a sampled draw takes exactly one value from `generator`."""
    if params.greedy:
        return int(logits_v.argmax())
    probs = torch.softmax(filter_logits(logits_v, params.temperature, params.top_k, params.top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
