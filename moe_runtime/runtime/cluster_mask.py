"""The driver's side of transport.on_expert_failure = mask: one mask for the whole cluster, and answers that say
which experts they were computed without.

Forward (`forward_under_one_mask`): the rows of a forward are split over the router workers. Each runs its part
under the mask the cluster decided (`down`: actor -> why, the union of what every worker found down; the mask
is `lost_experts(placement, down)`). A worker that meets an expert outside that mask does not widen on its own:
it answers None with the actors it found down (expert_mask.ExpertMask.run_once). The driver then widens the
decision to the union, sends it to every worker with the re-run, and re-runs every part not computed under it:
under grouped or top_p routing a row's answer depends on the mask even when the row chose no lost expert, so a
response with rows under two masks would equal no model. The answer's `degraded` is that one mask.

Generation (`ReportingBackend`): the running batch lives on one worker, so every row of a step shares its mask.
Each prefill / decode reply carries the mask that step ran under; the backend keeps it (`last_masked`, and over
its life `seen`) and calls `on_down` whenever the worker found actors down, so the cluster heals in the
background (serving returns to unmasked answers without a restart).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moe_runtime.dispatch.failover import lost_experts
from moe_runtime.placement import Placement
from moe_runtime.runtime.calls import get_within
from moe_runtime.runtime.generation_backend import RemoteBackend
from moe_runtime.runtime.recovery import is_fault

__all__ = ["AgreedForward", "MaskDisagreement", "ReportingBackend", "forward_under_one_mask", "mask_pairs"]

Pairs = list[list[int]]  # [[layer, expert], ...] sorted


class MaskDisagreement(RuntimeError):
    """The router workers did not settle on one mask within the rounds allowed (a placement changing under us)."""


def mask_pairs(placement: Placement, down: dict[int, str]) -> Pairs:
    """The (layer, expert) pairs the actors `down` leave without a live replica: the mask they imply."""
    return [[layer, e] for layer, es in sorted(lost_experts(placement, down).items()) for e in sorted(es)]


@dataclass(frozen=True)
class AgreedForward:
    logits: torch.Tensor  # [B, S, V] (the parts concatenated in order)
    degraded: Pairs  # the one mask every part ran under ([] = none)
    down: dict[int, str]  # actors found down (a heal brings them back)
    rounds: int  # 1 = nobody met an expert outside the mask


def forward_under_one_mask(run: Callable[[list[int], dict[int, str]], Sequence[dict]], parts: int,
                           placement: Placement, mask_mode: bool) -> AgreedForward:  # fmt: skip
    """Run `parts` forward parts so that all are computed under one mask.

    run(indices, down) runs the parts `indices` (each worker first adopts `down`) and returns, per part, the
    worker's reply {"logits": tensor | None, "masked": pairs, "down": {actor: why}}. In fail mode (no mask) one
    round: a lost expert raises in the worker. Each further round widens `down` (at most once per actor)."""
    replies: list[dict | None] = [None] * parts
    down: dict[int, str] = {}
    todo = list(range(parts))
    for rounds in range(1, placement.num_actors + 3):
        for i, reply in zip(todo, run(todo, down)):
            replies[i] = reply
        found = dict(down)
        for r in replies:
            found.update({int(a): why for a, why in r["down"].items()})
        target = mask_pairs(placement, found) if mask_mode else []
        todo = [i for i, r in enumerate(replies)
                if r["logits"] is None or [list(p) for p in r["masked"]] != target]  # fmt: skip
        if not todo:
            logits = torch.cat([r["logits"] for r in replies])
            return AgreedForward(logits, target, found, rounds)
        if not mask_mode:  # cannot happen: without a mask every worker answers or raises
            raise MaskDisagreement(f"router workers answered without logits in fail mode: parts {todo}")
        down = found
    raise MaskDisagreement(f"the router workers did not settle on one expert mask in {rounds} rounds (parts "
                           f"{todo} still differ from {target}); the placement changed during the forward?")


class ReportingBackend(RemoteBackend):
    """RemoteBackend whose prefill and decode steps also say the mask they ran under (RouterWorker
    `generation_reported`, one Ray call as before): `last_masked` (the last step's), `seen` (every step's since
    `take_seen`); on_down() when the worker has found actors down (Cluster: heal in the background)."""

    def __init__(self, worker: Any, model: Any, on_down: Callable[[], None] | None = None, **kw: Any):
        super().__init__(worker, model, **kw)
        self.on_down = on_down
        self.last_masked: Pairs = []
        self._seen: set[tuple[int, int]] = set()

    def take_seen(self) -> Pairs:
        seen, self._seen = sorted(self._seen), set()
        return [list(p) for p in seen]

    def _call(self, op: str, *args: Any) -> Any:
        if op not in ("prefill", "decode"):  # join / stats run no forward
            return super()._call(op, *args)
        self.calls += 1
        try:
            out, masked, any_down = get_within(self.worker.generation_reported.remote(op, *args), self.timeout_s,
                                               f"generation {op}")  # fmt: skip
        except BaseException as err:
            if self.on_down is not None and is_fault(err):  # e.g. no live replica (fail mode): bring it back
                self.on_down()
            raise
        self.last_masked = sorted([int(la), int(e)] for la, e in masked)
        self._seen.update((la, e) for la, e in self.last_masked)
        if any_down and self.on_down is not None:
            self.on_down()
        return out
