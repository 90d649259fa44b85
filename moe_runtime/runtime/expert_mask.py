"""Serving around experts with no live replica (transport.on_expert_failure = mask), in a router worker.

An inference forward that meets an expert whose every replica is down fails in the dispatcher
(dispatch/failover.ExpertsUnavailable). In mask mode the worker then excludes, in every layer, the experts the
actors found down leave without a live replica (`lost_experts`), by setting the routers' expert_alive, and runs the
forward again from the start: every layer routes over the same live experts, so the logits equal an in-process
model whose routers exclude the same experts. A cached decode step is re-run from the cache as it was before the
step (keys and values are written to the same slots again; the LFA inputs are put back). The mask stays until the
driver re-wires the worker (the cluster healed: `clear`). Training never masks: its forwards are not run here.

A forward whose rows are split over several workers must run under ONE mask (under grouped / top_p routing a row's
answer depends on the mask even when it chose no lost expert): there the mask is the driver's decision
(runtime/cluster_mask.py). `adopt` takes it (the actors some worker found down), `run_once` runs a forward under
it and answers None, instead of widening on its own, when the forward met experts outside it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch

from moe_runtime.dispatch.failover import ExpertsUnavailable, Failover, lost_experts
from moe_runtime.generation.backend import LocalBackend
from moe_runtime.model.attention import KVCache
from moe_runtime.model.routing import check_expert_alive
from moe_runtime.model.transformer import MoETransformer
from moe_runtime.placement import Placement

__all__ = ["ExpertMask", "MaskError", "MaskingBackend"]

T = TypeVar("T")


class MaskError(RuntimeError):
    """Masking the lost experts would leave a layer's routing fewer experts than it must take."""


class ExpertMask:
    """The experts this worker's routers exclude (layer -> experts), and the forwards that ran degraded."""

    def __init__(self, model: MoETransformer, failover: Failover, placement: Callable[[], Placement], enabled: bool):
        self.model, self.failover, self._placement, self.enabled = model, failover, placement, enabled
        self.masked: dict[int, list[int]] = {}
        self.degraded_seen: set[tuple[int, int]] = set()  # (layer, expert) masked in a forward since `take_seen`

    def pairs(self) -> list[tuple[int, int]]:
        return sorted((layer, e) for layer, es in self.masked.items() for e in es)

    def clear(self) -> None:
        """The cluster healed (the worker was re-wired): route to every expert again."""
        for moe in self.model.moe_layers:
            moe.router.set_expert_alive(None)
        self.masked = {}

    def take_seen(self) -> list[tuple[int, int]]:
        seen, self.degraded_seen = sorted(self.degraded_seen), set()
        return seen

    def _needs_wider(self) -> bool:
        """Do the down actors leave experts without a replica that the mask does not exclude yet?"""
        lost = lost_experts(self._placement(), self.failover.down)
        return not all(set(es) <= set(self.masked.get(layer, [])) for layer, es in lost.items())

    def _widen(self, why: str) -> bool:
        """Mask every expert the down actors leave without a replica; False when nothing new would be masked."""
        if not self._needs_wider():
            return False
        lost = lost_experts(self._placement(), self.failover.down)
        routers = [moe.router for moe in self.model.moe_layers]
        flags = {layer: [e not in es for e in range(routers[layer].num_experts)] for layer, es in lost.items()}
        for layer, alive in flags.items():  # every layer checked before any is set: a refused mask changes nothing
            r = routers[layer]
            nodes = None if r.expert_nodes_e is None else r.expert_nodes_e.tolist()
            try:
                check_expert_alive(alive, r.routing, r.num_experts, nodes)
            except ValueError as reason:
                raise MaskError(f"{why}; masking them would leave too few experts: layer {layer}: "
                                f"{reason}") from None  # fmt: skip
        for layer, alive in flags.items():
            routers[layer].set_expert_alive(alive)
        self.masked = {layer: list(es) for layer, es in lost.items()}
        return True

    def run(self, forward: Callable[[], T], before_retry: Callable[[], None] | None = None) -> T:
        """forward(), again with a wider mask each time it meets experts without a live replica (mask mode)."""
        for _ in range(len(self.model.moe_layers) * self._placement().num_experts + 1):
            try:
                out = forward()
            except ExpertsUnavailable as err:
                if not self.enabled or not self._widen(err.details):
                    raise
                if before_retry is not None:
                    before_retry()
                continue
            self.degraded_seen.update(self.pairs())
            return out
        raise AssertionError("unreachable: every expert was masked once")

    def adopt(self, down: Mapping[int, str]) -> bool:
        """The cluster's decision: the actors some router worker found down (actor -> why) are down here too, and
        (mask mode) what they leave without a replica is masked. True when the mask widened; a refused mask
        (too few live experts) leaves the routers as they were and raises MaskError."""
        known = self.failover.down
        for actor, why in down.items():
            if int(actor) not in known:
                self.failover.mark_down(int(actor), why)
        if not self.enabled:
            return False
        return self._widen(f"the cluster's mask (actors {sorted(int(a) for a in down)} down)")

    def run_once(self, forward: Callable[[], T]) -> T | None:
        """forward() under the mask as it is; None (mask mode) when it met experts without a live replica that the
        mask does not exclude: the driver widens the mask on every worker and runs the forward again."""
        try:
            out = forward()
        except ExpertsUnavailable:
            if not self.enabled or not self._needs_wider():
                raise
            return None
        self.degraded_seen.update(self.pairs())
        return out


class MaskingBackend(LocalBackend):
    """LocalBackend whose prefill and decode steps run under an ExpertMask (re-run on a wider mask)."""

    def __init__(self, model: MoETransformer, mask: ExpertMask):
        super().__init__(model)
        self.mask = mask

    def prefill(self, prompts: Sequence[Sequence[int]], capacity: int) -> tuple[KVCache, torch.Tensor]:
        return self.mask.run(lambda: LocalBackend.prefill(self, prompts, capacity))

    def decode(self, cache: KVCache, tokens: Sequence[int]) -> torch.Tensor:
        lfa_before = [layer.lfa_inputs_b2d for layer in cache.layers]  # replaced, never written in place

        def restore() -> None:  # keys/values of the failed try are overwritten at the same slots by the next
            for layer, lfa in zip(cache.layers, lfa_before):
                layer.lfa_inputs_b2d = lfa

        return self.mask.run(lambda: LocalBackend.decode(self, cache, tokens), restore)
