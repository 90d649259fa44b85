"""Frames larger than the gRPC message limit (issue 13): split into chunked streams automatically, both directions,
never a failure; the results equal the in-process expert math bit for bit, and a MoE layer over RemoteDispatcher
with a 1 MiB message limit equals the LocalDispatcher oracle (outputs and every gradient). Frames that fit one
message stay unary. The only bound on a whole frame is max_frame_bytes (a clear error; the server goes on)."""

from __future__ import annotations

import copy

import grpc
import pytest
import torch
from torch.testing import assert_close

from moe_runtime.dispatch.client import ExpertClient
from moe_runtime.dispatch.codec import decode_frame
from moe_runtime.dispatch.remote import RemoteDispatcher
from moe_runtime.dispatch.server import ExpertServer
from moe_runtime.model.experts import SwiGLUExperts, grouped_swiglu_backward, grouped_swiglu_forward_saving
from moe_runtime.model.moe_layer import LocalDispatcher, MoELayer, StepContext
from moe_runtime.model.router import AttentionRouter
from moe_runtime.placement import Placement
from moe_runtime.runtime.expert_shards import ExpertShards
from tests.dispatch.helpers import TOKEN, D, call_code, dispatch_frame, make_shards

LIMIT = 1 << 20  # max_message_bytes of server and client: 1 MiB
ROWS = (5 << 20) // (D * 4)  # a 5 MiB frame
COUNTS = [ROWS // 3, ROWS - ROWS // 3]


@pytest.fixture(scope="module")
def served():
    weights = make_shards([(0, 0), (0, 1)])
    server = ExpertServer(ExpertShards(weights), auth_token=TOKEN, max_message_bytes=LIMIT)
    server.start()
    client = ExpertClient(server.address, TOKEN, 30.0, max_message_bytes=LIMIT)  # no chunk_bytes: automatic
    yield server, client, weights
    client.close()
    server.stop()


def test_a_5mib_frame_crosses_a_1mib_limit_both_ways_equal_to_in_process(served):
    server, client, weights = served
    g = torch.Generator().manual_seed(3)
    x = torch.randn(ROWS, D, generator=g)
    dy = torch.randn(ROWS, D, generator=g)
    frame = dispatch_frame([0, 1], COUNTS, x, step=2)
    assert len(frame) > 5 * LIMIT and client.streams(frame)
    w = [weights[(0, 0)], weights[(0, 1)]]
    y_ref, hs = grouped_swiglu_forward_saving(x, COUNTS, w)
    dx_ref, _ = grouped_swiglu_backward(dy, COUNTS, x, hs, w)
    for wait in (True, False):  # blocking and future paths; the first forward's activations are overwritten
        reply = client.dispatch(frame, wait=wait).result()
        assert len(reply) > 5 * LIMIT
        assert torch.equal(decode_frame(reply, out_dtype=None).tensors["y"], y_ref)
    grad = client.backward(dispatch_frame([0, 1], COUNTS, dy, kind="backward", name="dy", step=2)).result()
    assert torch.equal(decode_frame(grad, out_dtype=None).tensors["dx"], dx_ref)
    client.end_step(2)
    stats = server.stats()
    assert stats["requests"] == {"dispatch": 2, "backward": 1} and not stats["rejected"]
    assert stats["bytes_in"] > 15 * LIMIT  # every frame was served whole, from chunks of at most the limit


def test_frames_that_fit_stay_unary(served):
    _, client, _ = served
    small = dispatch_frame([0], [64], torch.randn(64, D), meta={"save": False})
    assert not client.streams(small)
    assert decode_frame(client.dispatch(small).result(), out_dtype=None).tensors["y"].shape == (64, D)


def test_the_frame_bound_is_a_clear_error_and_the_server_goes_on():
    with ExpertServer(ExpertShards(make_shards([(0, 0)])), auth_token=TOKEN, max_message_bytes=LIMIT,
                      max_frame_bytes=2 * LIMIT) as srv, \
            ExpertClient(srv.address, TOKEN, 30.0, max_message_bytes=LIMIT) as c:  # fmt: skip
        big = dispatch_frame([0], [ROWS], torch.randn(ROWS, D))
        err = call_code(lambda: c.dispatch(big).result())
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"declares {len(big)} bytes: exceeds the limit of {2 * LIMIT}" in err.details
        ok = dispatch_frame([0], [8], torch.randn(8, D), meta={"save": False})
        assert decode_frame(c.dispatch(ok).result()).header.kind == "result"


E, FF, K, ACTORS = 4, 24, 2, 2


def test_remote_layer_over_a_1mib_limit_equals_local():
    """A MoE layer whose frames are ~1.3 MiB each (two actors) through ExpertServers with a 1 MiB limit: forward,
    input grads, router grads and expert weight grads equal the in-process oracle (fp32 tolerance: the layer
    sums its tokens' expert outputs in a different order than the local path)."""
    torch.manual_seed(0)
    placement = Placement.contiguous(1, E, ACTORS)
    router = AttentionRouter(D, E, K, init_std=0.5)
    experts = SwiGLUExperts(E, D, FF, init_std=0.2)
    local = MoELayer(router, LocalDispatcher(experts, placement, num_layers=1), layer_index=0)
    shards = [ExpertShards({(0, e): (experts.w1[e].detach().clone(), experts.w2[e].detach().clone())
                            for _, e in placement.shards_of(a)}) for a in range(ACTORS)]  # fmt: skip
    servers = [ExpertServer(s, auth_token=TOKEN, max_message_bytes=LIMIT) for s in shards]
    try:
        clients = [ExpertClient(srv.start(), TOKEN, 30.0, max_message_bytes=LIMIT) for srv in servers]
        remote = MoELayer(copy.deepcopy(router), RemoteDispatcher(0, placement, clients), layer_index=0)
        x = torch.randn(4, 5120, D)  # 20480 tokens x top-2 x 16 x 4 B = 2.6 MB of token copies
        g = torch.randn(4, 5120, D)
        x_loc, x_rem = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_loc = local(x_loc)[0]
        y_rem = remote(x_rem, StepContext(1))[0]
        assert min((d.stop - d.start) * D * 4 for d in remote.last_plan.destinations) > LIMIT  # every frame streams
        assert_close(y_rem, y_loc)
        y_loc.backward(g)
        y_rem.backward(g)
        assert_close(x_rem.grad, x_loc.grad)
        for p_rem, p_loc in zip(remote.router.parameters(), local.router.parameters()):
            assert_close(p_rem.grad, p_loc.grad)
        for s in shards:  # sums over ~10k rows each, in another order than the local path: fp32 rounding of the sum
            for (_, e), (g1, g2) in s.grads().items():
                for got, ref in ((g1, experts.w1.grad[e]), (g2, experts.w2.grad[e])):
                    assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
        assert all(srv.stats()["bytes_in"] > 2 * LIMIT for srv in servers)
        for c in clients:
            c.close()
    finally:
        for srv in servers:
            srv.stop()
