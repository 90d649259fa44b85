"""Serving through a lost expert actor: an inference forward re-routes the segments of a dead actor to live
replicas of the same experts, so a request with a live replica for every expert it chose does not fail.

One `Failover` per router worker, shared by its RemoteDispatchers: the actors found down (UNAVAILABLE, a deadline,
or FAILED_PRECONDITION: a restarted server without its shards) are remembered until the driver re-wires the worker
(`reset`), and later forwards route around them without trying them first. An expert whose every replica is down
fails the forward with an error naming the actor, the layer and the experts (transport.on_expert_failure = fail);
with `mask` the router worker catches that error, excludes the experts `lost_experts` names from routing in every
layer (the routers' expert_alive) and runs the forward again (runtime/expert_mask.py).

Only inference: a training forward keeps activations on the actor it reached for its backward, so training
recovers at the step level (runtime/recovery.py) instead.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import grpc
import torch

from moe_runtime.dispatch.client import ExpertCallError
from moe_runtime.dispatch.codec import FrameError, decode_frame, encode_frame
from moe_runtime.dispatch.fanout import ExpertCall, fan_out
from moe_runtime.model.device import HostStaging
from moe_runtime.model.plan import DispatchPlan
from moe_runtime.placement import Placement

if TYPE_CHECKING:
    from moe_runtime.dispatch.remote import RemoteDispatcher, _Exchange

__all__ = ["DOWN_CODES", "ExpertsUnavailable", "Failover", "lost_experts"]

# statuses that mean "this actor cannot answer now", as opposed to a bad request
DOWN_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.CANCELLED)  # fmt: skip


class ExpertsUnavailable(ExpertCallError):
    """Experts of a layer whose every replica is down (on_expert_failure = fail)."""

    def __init__(self, address: str, method: str, layer: int | None, step: int | None, code: grpc.StatusCode | None,
                 details: str):  # fmt: skip
        super().__init__(address, method, layer, step, code, details)


def lost_experts(placement: Placement, down: Iterable[int]) -> dict[int, list[int]]:
    """layer -> the experts whose every replica is on a down actor (none: the layer is absent)."""
    dead = set(down)
    out: dict[int, list[int]] = {}
    for layer, replicas in enumerate(placement.replicas):
        lost = [e for e, actors in enumerate(replicas) if all(a in dead for a in actors)]
        if lost:
            out[layer] = lost
    return out


class Failover:
    """The actors a router worker found down, and re-routing around them."""

    def __init__(self, on_expert_failure: str = "fail") -> None:
        self.on_expert_failure = on_expert_failure  # named in the error; "mask": the router worker re-routes
        self._lock = threading.Lock()
        self._down: dict[int, str] = {}  # actor -> why
        self.rerouted_calls = 0  # forwards that went around a down actor

    @property
    def down(self) -> dict[int, str]:
        with self._lock:
            return dict(self._down)

    def reset(self) -> None:
        """The driver re-wired this worker (new addresses / placement): every actor is presumed up again."""
        with self._lock:
            self._down = {}

    def mark_down(self, actor: int, why: str) -> None:
        with self._lock:
            self._down[actor] = why

    def forward(self, disp: RemoteDispatcher, exchange: _Exchange, x_nd: torch.Tensor, plan: DispatchPlan,
                failed: ExpertCallError | None = None) -> torch.Tensor:  # fmt: skip
        """y_nd for an inference forward, around down actors (each found down at most once per call). `failed`:
        the error of a first attempt made elsewhere (RemoteDispatcher.dispatch_combine): its actor is marked down
        first, so the stopped actor is not waited for a second time (raised as is when it is not a down code)."""
        if failed is not None:
            self._mark_failed(disp, failed, self.down)
        for _ in range(disp.placement.num_actors + 1):
            down = self.down
            try:
                if not any(d.actor in down for d in plan.destinations):
                    return exchange.run("dispatch", x_nd.detach())
                y = self._rerouted(disp, exchange, x_nd, plan, down)
                with self._lock:
                    self.rerouted_calls += 1
                return y
            except ExpertsUnavailable:
                raise
            except ExpertCallError as err:
                self._mark_failed(disp, err, down)
        raise AssertionError("unreachable: every actor was marked down once")

    def _mark_failed(self, disp: RemoteDispatcher, err: ExpertCallError, down: dict[int, str]) -> None:
        """Mark err's actor down, or raise err: not a down code, an unknown address, or an actor already down."""
        actor = _actor_of(disp, err.address)
        if err.code not in DOWN_CODES or actor is None or actor in down:
            raise err
        self.mark_down(actor, f"{err.code.name if err.code else 'BAD_REPLY'}: {err.details}")

    def _rerouted(self, disp: RemoteDispatcher, exchange: _Exchange, x_nd: torch.Tensor, plan: DispatchPlan,
                  down: dict[int, str]) -> torch.Tensor:  # fmt: skip
        """Each segment of a down actor goes to a live replica of its expert (round robin); rows gathered per
        destination actor and (layer, expert), replies scattered back to the same rows."""
        layer = disp.layer_index
        replicas = disp.placement.replicas[layer]
        rows: dict[int, dict[int, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
        lost: dict[int, list[int]] = defaultdict(list)  # down actor -> experts without a live replica
        turn: dict[int, int] = defaultdict(int)
        for seg in plan.segments:
            actor = seg.actor
            if actor in down:
                live = [a for a in replicas[seg.expert] if a not in down]
                if not live:
                    lost[actor].append(seg.expert)
                    continue
                actor = live[turn[seg.expert] % len(live)]
                turn[seg.expert] += 1
            rows[actor][seg.expert].append(torch.arange(seg.start, seg.start + seg.count))
        if lost:
            what = "; ".join(f"actor {a} ({down[a]}) held the only replica of experts {sorted(set(es))}"
                             for a, es in sorted(lost.items()))  # fmt: skip
            raise ExpertsUnavailable(
                disp.clients[min(lost)].address, "Dispatch", layer, exchange.step, grpc.StatusCode.UNAVAILABLE,
                f"layer {layer}: {what}; no live replica to fail over to (transport.on_expert_failure = "
                f"{self.on_expert_failure})",
            )
        staging = HostStaging.shared(x_nd.device)
        x_host = staging.to_host(x_nd.detach(), disp.wire_dtype)
        out = staging.host_buffer(x_nd.shape, x_nd.dtype)
        requests, index = [], []
        for actor in sorted(rows):
            experts = sorted(rows[actor])
            idx = torch.cat([torch.cat(rows[actor][e]) for e in experts])
            counts = [sum(len(r) for r in rows[actor][e]) for e in experts]
            frame = encode_frame("dispatch", layer=layer, step=exchange.step, mb=exchange.mb,
                                 pv=plan.placement_version, experts=experts, counts=counts,
                                 tensors={"x": x_host.index_select(0, idx)}, wire_dtype=disp.wire_dtype,
                                 meta=exchange.meta, validate=False)  # fmt: skip
            requests.append(ExpertCall(disp.clients[actor], "Dispatch", frame, layer, exchange.step))
            index.append((idx, experts, counts))
        for (client, *_), (idx, experts, counts), data in zip(requests, index, fan_out(requests)):
            try:
                reply = decode_frame(data, expected_kind="result", out_dtype=None)
                y = reply.tensors.get("y")
                if list(reply.header.experts) != experts or list(reply.header.counts) != counts or y is None \
                        or tuple(y.shape) != (len(idx), out.shape[1]):
                    raise FrameError(f"reply (experts {list(reply.header.experts)}, counts "
                                     f"{list(reply.header.counts)}) does not answer the request (experts {experts}, "
                                     f"counts {counts})")
            except FrameError as e:
                raise ExpertCallError(client.address, "Dispatch", layer, exchange.step, None, f"bad reply: {e}")
            out.index_copy_(0, idx, y.to(out.dtype))
        return staging.upload(out)


def _actor_of(disp: RemoteDispatcher, address: str) -> int | None:
    matches: Sequence[int] = [i for i, c in enumerate(disp.clients) if c.address == address]
    return matches[0] if matches else None
