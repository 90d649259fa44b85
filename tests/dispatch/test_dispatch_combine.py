"""RemoteDispatcher.dispatch_combine: inference combines straight from the reply views (model/plan.py
combine_parts), bit-equal to plan.combine of the joined output; every other case takes the two calls; a reply that
is not the expected frame goes through the full checks (a malformed one is a clear ExpertCallError)."""

from __future__ import annotations

import grpc
import pytest
import torch

from moe_runtime.dispatch.client import ExpertCallError, ExpertClient, ExpertFuture
from moe_runtime.dispatch.codec import decode_frame, encode_frame
from moe_runtime.dispatch.envelope import unwrap_frame, wrap_frame
from moe_runtime.dispatch.remote import RemoteDispatcher
from moe_runtime.dispatch.server import ExpertServer
from moe_runtime.model.moe_layer import StepContext
from moe_runtime.model.plan import DispatchPlan
from moe_runtime.placement import Placement
from moe_runtime.runtime.expert_shards import ExpertShards

TOKEN = "combine-test-token"
E, D, FF, K, ACTORS, T = 8, 32, 16, 2, 2, 24


class _Ctx:
    """A stand-in gRPC servicer context: the handler runs in process (the token gate is not under test here)."""

    code = details = None

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


class InProcessClient(ExpertClient):
    """An ExpertClient whose calls run the real server handler in this process, optionally rewriting the reply."""

    def __init__(self, server: ExpertServer, address: str, rewrite=None):
        self.address, self.chunk_bytes, self.deadline_s, self._unary_limit = address, None, 5.0, 1 << 30
        self._server, self._rewrite, self.calls = server, rewrite, 0

    def _serve(self, method, message):
        self.calls += 1
        handler = self._server._rpc_dispatch if method == "Dispatch" else self._server._rpc_backward
        ctx = _Ctx()
        reply = handler(message, ctx)
        assert ctx.code is None, (ctx.code, ctx.details)  # the handler refused the request: say why
        return reply if self._rewrite is None else self._rewrite(reply)

    def call(self, method, frame, *, layer=None, step=None, wait=False, wrapped=False):
        return ExpertFuture(None, self, method, layer, step, self._serve(method, frame if wrapped else wrap_frame(frame)))

    async def call_async(self, method, message):  # fan_out of several destinations
        return self._serve(method, message)

    def close(self) -> None:
        pass


def setup(rewrite=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    placement = Placement.contiguous(1, E, ACTORS)
    w1, w2 = torch.randn(E, D, 2 * FF, generator=g) * 0.2, torch.randn(E, FF, D, generator=g) * 0.2
    clients = []
    for a in range(ACTORS):
        shards = ExpertShards({(layer, e): (w1[e], w2[e]) for layer, e in placement.shards_of(a)})
        clients.append(InProcessClient(ExpertServer(shards, auth_token=TOKEN), f"in-process-{a}", rewrite))
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    gates = torch.softmax(torch.randn(T, K, generator=g), -1)
    plan = DispatchPlan.build(ids, placement, 0)
    x_nd = plan.gather(torch.randn(T, D, generator=g))
    return RemoteDispatcher(0, placement, clients), plan, x_nd, gates, clients


def test_inference_combines_from_the_replies_bit_equal():
    disp, plan, x_nd, gates, clients = setup()
    assert len(plan.destinations) == ACTORS  # several replies: combine_parts runs over several views
    with torch.no_grad():
        fused = disp.dispatch_combine(x_nd, plan, StepContext(0), gates)
        joined = plan.combine(disp(x_nd, plan, StepContext(0)), gates)
    assert torch.equal(fused, joined)
    assert fused.shape == (T, D) and fused.abs().sum() > 0


def test_graph_and_hooks_take_the_two_calls():
    disp, plan, x_nd, gates, _ = setup(seed=1)
    x = x_nd.clone().requires_grad_()
    w = gates.clone().requires_grad_()
    out = disp.dispatch_combine(x, plan, StepContext(3), w)  # training: autograd through both
    out.sum().backward()
    assert x.grad is not None and w.grad is not None and w.grad.abs().sum() > 0
    seen = []
    handle = disp.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        hooked = disp.dispatch_combine(x_nd, plan, StepContext(0), gates)
        plain = plan.combine(disp(x_nd, plan, StepContext(0)), gates)
    handle.remove()
    assert seen == [1, 1] and torch.equal(hooked, plain)  # the hook saw the dispatch of the fused call too


def _reencode_with_meta(reply):
    """Another valid encoding of the same answer (meta added): not the expected bytes, accepted by the full decode."""
    f = decode_frame(unwrap_frame(reply), out_dtype=None)
    h = f.header
    return wrap_frame(encode_frame(h.kind, layer=h.layer, step=h.step, mb=h.mb, pv=h.pv, experts=h.experts,
                                   counts=h.counts, tensors=f.tensors, meta={"note": 1}))  # fmt: skip


def test_unexpected_but_valid_reply_is_accepted():
    disp, plan, x_nd, gates, _ = setup(seed=2)
    ref, *_ = setup(seed=2)
    with torch.no_grad():
        want = plan.combine(ref(x_nd, plan, StepContext(0)), gates)
        disp_meta, *_ = setup(rewrite=_reencode_with_meta, seed=2)
        assert torch.equal(disp_meta.dispatch_combine(x_nd, plan, StepContext(0), gates), want)


@pytest.mark.parametrize("junk", [b"", b"MOEF\x05\x00\x00\x00junk", b"not a frame at all" * 4])
def test_malformed_reply_is_a_clear_error_and_the_server_keeps_serving(junk):
    disp, plan, x_nd, gates, clients = setup(rewrite=lambda reply: wrap_frame(junk), seed=4)
    with torch.no_grad(), pytest.raises(ExpertCallError, match="bad reply"):
        disp.dispatch_combine(x_nd, plan, StepContext(0), gates)
    good, *_ = setup(seed=4)
    for c, g in zip(clients, good.clients):  # the same servers answer a well-formed exchange afterwards
        c._rewrite = None
    with torch.no_grad():
        assert torch.equal(disp.dispatch_combine(x_nd, plan, StepContext(0), gates),
                           plan.combine(good(x_nd, plan, StepContext(0)), gates))


class _Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "server went away"


def test_failed_call_in_the_pipeline_is_an_expert_call_error_after_all_finished():
    disp, plan, x_nd, gates, clients = setup(seed=5)

    async def fail(method, message):
        raise _Unavailable()

    clients[1].call_async = fail  # the second destination fails; the first one's reply arrived and was used
    with torch.no_grad(), pytest.raises(ExpertCallError, match="UNAVAILABLE.*server went away"):
        disp.dispatch_combine(x_nd, plan, StepContext(0), gates)
    assert clients[0].calls == 1
    del clients[1].call_async  # the dispatcher serves the next exchange
    with torch.no_grad():
        assert disp.dispatch_combine(x_nd, plan, StepContext(0), gates).shape == (T, D)


def test_with_failover_fused_equals_plain_and_a_down_actor_goes_through_failover():
    from moe_runtime.dispatch.failover import ExpertsUnavailable, Failover

    disp, plan, x_nd, gates, clients = setup(seed=6)
    disp.failover = Failover()
    with torch.no_grad():
        want = plan.combine(disp(x_nd, plan, StepContext(0)), gates)  # through Failover.forward
        assert torch.equal(disp.dispatch_combine(x_nd, plan, StepContext(0), gates), want)

        async def fail(method, message):
            raise _Unavailable()

        clients[1].call_async = fail
        with pytest.raises(ExpertsUnavailable, match="no live replica"):  # contiguous: actor 1's experts are lost
            disp.dispatch_combine(x_nd, plan, StepContext(0), gates)
        assert list(disp.failover.down) == [1]


def test_a_failed_actor_with_replicas_is_called_once_then_routed_around():
    """Every expert on both actors; actor 1 fails in the fused path: the answer comes from actor 0's replicas, equal
    to the plain path, and actor 1 is not tried a second time (a stopped actor would cost its deadline twice: a
    router worker answering after 2x transport.deadline_s is taken for hung)."""
    from moe_runtime.dispatch.failover import Failover

    g = torch.Generator().manual_seed(7)
    placement = Placement.contiguous(1, E, ACTORS).with_replicas((tuple((0, 1) for _ in range(E)),))
    w1, w2 = torch.randn(E, D, 2 * FF, generator=g) * 0.2, torch.randn(E, FF, D, generator=g) * 0.2
    shards = [ExpertShards({(0, e): (w1[e], w2[e]) for e in range(E)}, placement.version) for _ in range(ACTORS)]
    clients = [InProcessClient(ExpertServer(s, auth_token=TOKEN), f"in-process-{a}") for a, s in enumerate(shards)]
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    gates = torch.softmax(torch.randn(T, K, generator=g), -1)
    plan = DispatchPlan.build(ids, placement, 0)
    assert len(plan.destinations) == ACTORS
    x_nd = plan.gather(torch.randn(T, D, generator=g))
    with torch.no_grad():
        want = plan.combine(RemoteDispatcher(0, placement, clients)(x_nd, plan, StepContext(0)), gates)
    tried = []

    async def fail(method, message):
        tried.append(method)
        raise _Unavailable()

    disp = RemoteDispatcher(0, placement, clients)
    disp.failover = Failover()
    clients[1].call_async = fail
    with torch.no_grad():
        got = disp.dispatch_combine(x_nd, plan, StepContext(0), gates)
    assert list(disp.failover.down) == [1] and tried == ["Dispatch"], tried
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
