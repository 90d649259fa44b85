"""RemoteDispatcher against the LocalDispatcher oracle, with four ExpertServers in separate OS processes.

Every test runs twice: Dispatch / Backward over gRPC, and over the servers' TCP lanes (dispatch/lane.py).
Distributed correctness = the remote path matches the local path: outputs, input grads, router grads and expert
weight grads (read back from the servers), fp32 with assert_close's default fp32 tolerance, with and without
replicated experts (replica grads summed with sum_replica_grads).
"""

from __future__ import annotations

import copy

import grpc
import pytest
import torch
from torch.testing import assert_close

from moe_runtime.dispatch.client import ExpertCallError, ExpertClient
from moe_runtime.dispatch.remote import RemoteDispatcher
from moe_runtime.model.experts import SwiGLUExperts
from moe_runtime.model.moe_layer import LocalDispatcher, MoELayer, StepContext
from moe_runtime.model.plan import DispatchPlan
from moe_runtime.model.router import AttentionRouter
from moe_runtime.placement import Placement
from moe_runtime.runtime.expert_shards import sum_replica_grads
from tests.dispatch.servers import start_servers, stop_servers

TOKEN = "remote-test-token"
E, D, FF, K, ACTORS = 8, 32, 64, 2, 4
LAYER = 1  # a non-zero layer index, so layer keys are exercised

CONTIGUOUS = Placement.contiguous(2, E, ACTORS)
# Hot experts 0 and 7 on three actors, expert 3 on two; layer 0 is unused by the test layer.
REPLICATED = CONTIGUOUS.with_replicas(
    (CONTIGUOUS.replicas[0], ((0, 1, 2), (0,), (1,), (1, 3), (2,), (2,), (3,), (3, 0, 1)))
)


@pytest.fixture(scope="module", params=["grpc", "tcp"])
def servers(request):
    """Four server processes and a client of each, on gRPC or on the servers' TCP lanes (transport.lane)."""
    procs = start_servers(ACTORS, auth_token=TOKEN, threads=4, start_timeout=90)
    clients = [ExpertClient(p.address, TOKEN, deadline_s=20.0, lane=request.param == "tcp") for p in procs]
    yield procs, clients
    for c in clients:
        c.close()
    stop_servers(procs)


def deploy(servers, experts: SwiGLUExperts, placement: Placement) -> None:
    """What the cluster does at a placement change: each actor loads exactly its shards, at the new version."""
    procs, _ = servers
    for actor, proc in enumerate(procs):
        shards = {(layer, e): (experts.w1[e].detach(), experts.w2[e].detach())
                  for layer, e in placement.shards_of(actor)}  # fmt: skip
        proc.call("load", shards, replace=True)
        proc.call("set_placement_version", placement.version)
        proc.call("expert_token_counts", reset=True)


def build(placement, wire_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    router = AttentionRouter(D, E, K, init_std=0.5)
    experts = SwiGLUExperts(E, D, FF, init_std=0.2)
    local = MoELayer(router, LocalDispatcher(experts, placement, num_layers=2), layer_index=LAYER)
    return local, experts


def remote_layer(local, servers, placement, wire_dtype=torch.float32):
    _, clients = servers
    return MoELayer(copy.deepcopy(local.router), RemoteDispatcher(LAYER, placement, clients, wire_dtype),
                    layer_index=LAYER)  # fmt: skip


def server_grads(servers):
    procs, _ = servers
    return [p.call("grads") for p in procs]


@pytest.mark.parametrize("placement", [CONTIGUOUS, REPLICATED], ids=["contiguous", "replicated"])
def test_remote_layer_matches_local_fp32(servers, placement):
    procs, _ = servers
    local, experts = build(placement)
    deploy(servers, experts, placement)
    remote = remote_layer(local, servers, placement)

    # two micro-batches, both forwards before both backwards (in reverse): the step context is captured at forward
    xs = [torch.randn(2, 32, D) for _ in range(2)]
    gs = [torch.randn(2, 32, D) for _ in range(2)]
    x_loc = [x.clone().requires_grad_() for x in xs]
    x_rem = [x.clone().requires_grad_() for x in xs]
    y_loc = [local(x)[0] for x in x_loc]
    y_rem, plans = [], []
    for mb, x in enumerate(x_rem):
        y_rem.append(remote(x, StepContext(5, mb))[0])
        plans.append(remote.last_plan)
    for a, b in zip(y_rem, y_loc):
        assert_close(a, b)
    for actor, p in enumerate(procs):  # one saved entry per (micro-batch, destination actor)
        expected = [(5, mb, LAYER, 0) for mb, plan in enumerate(plans) if actor in [d.actor for d in plan.destinations]]
        assert p.call("saved_keys") == expected
    for mb in (1, 0):
        y_loc[mb].backward(gs[mb])
        y_rem[mb].backward(gs[mb])
    for a, b in zip(x_rem, x_loc):
        assert_close(a.grad, b.grad)
    for p_rem, p_loc in zip(remote.router.parameters(), local.router.parameters()):
        assert p_loc.grad.abs().sum() > 0
        assert_close(p_rem.grad, p_loc.grad)
    assert all(p.call("saved_keys") == [] for p in procs)  # backward consumed everything

    grads = server_grads(servers)
    summed = sum_replica_grads(grads, placement)
    for e in range(E):
        assert_close(summed[(LAYER, e)][0], experts.w1.grad[e])
        assert_close(summed[(LAYER, e)][1], experts.w2.grad[e])
    if placement is REPLICATED:  # the split really happened: every replica of expert 0 got some rows
        assert all(grads[a][(LAYER, 0)][0].abs().sum() > 0 for a in placement.replicas[LAYER][0])
    # write the sums back to every replica: replicas end up with identical grads
    for actor, proc in enumerate(procs):
        proc.call("set_grads", {k: summed[k] for k in placement.shards_of(actor)})
    grads = server_grads(servers)
    for (layer, e), (g1, g2) in summed.items():
        for a in placement.replicas[layer][e]:
            assert torch.equal(grads[a][(layer, e)][0], g1) and torch.equal(grads[a][(layer, e)][1], g2)
    # load statistics on the servers add up to the plan's expert counts
    counts: dict[tuple[int, int], int] = {}
    for p in procs:
        for k, n in p.call("expert_token_counts", reset=True).items():
            counts[k] = counts.get(k, 0) + n
    plan_counts = (plans[0].expert_counts + plans[1].expert_counts).tolist()
    assert counts == {(LAYER, e): n for e, n in enumerate(plan_counts) if n}
    assert sum(counts.values()) == 2 * 64 * K
    for p in procs:
        p.call("zero_grads")


def test_bf16_wire_is_close(servers):
    """bf16 keeps 8 mantissa bits: each cast rounds by at most 2**-9 relative. x is cast on the way out, y on the way
    back (and dy / dx likewise in backward); the experts compute in fp32 between. Relative error per element is a
    few 2**-9 ~ 0.4-1%; elements near zero come from cancellation in the last matmul, so their error is bounded by
    the output scale rather than their own value. Hence rtol 2e-2 and atol 1e-2 x max|reference|. Measured over 5
    seeds: max|err| / max|ref| = 0.24-0.43% for y, 0.09-0.36% for dx, 0.38-0.65% for the w1 grads (2-4x margin)."""
    local, experts = build(CONTIGUOUS, seed=1)
    deploy(servers, experts, CONTIGUOUS)
    remote = remote_layer(local, servers, CONTIGUOUS, wire_dtype=torch.bfloat16)
    x = torch.randn(4, 16, D)
    xl, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yl, _ = local(xl)
    yr, _ = remote(xr, StepContext(0))
    assert yr.dtype == torch.float32
    assert_close(yr, yl, rtol=2e-2, atol=1e-2 * float(yl.detach().abs().max()))
    assert not torch.equal(yr, yl)  # the wire really was bf16
    g = torch.randn_like(yl)
    yl.backward(g)
    yr.backward(g)
    assert_close(xr.grad, xl.grad, rtol=2e-2, atol=1e-2 * float(xl.grad.abs().max()))
    summed = sum_replica_grads(server_grads(servers), CONTIGUOUS)
    for e in range(E):
        ref = experts.w1.grad[e]
        assert_close(summed[(LAYER, e)][0], ref, rtol=2e-2, atol=1e-2 * float(ref.abs().max()))
    for p in servers[0]:
        p.call("zero_grads")


def test_store_does_not_grow_over_100_steps(servers):
    procs, clients = servers
    local, experts = build(CONTIGUOUS, seed=2)
    deploy(servers, experts, CONTIGUOUS)
    remote = remote_layer(local, servers, CONTIGUOUS)
    peak = 0
    for step in range(100):
        x = torch.randn(16, D, requires_grad=True)
        y, _ = remote(x, StepContext(step))
        if step % 3 == 0:
            y.sum().backward()  # a full step
        elif step % 3 == 1:
            with torch.no_grad():  # inference: the servers keep nothing
                remote(x, StepContext(step))
        # step % 3 == 2: forward with grad but the step is abandoned (no backward): EndStep must free it
        peak = max(peak, sum(c.health().saved_entries for c in clients))
        for c in clients:
            c.end_step(step, abort=step % 3 == 2)
    stats = [p.call("stats") for p in procs]
    assert [s["saved_entries"] for s in stats] == [0] * ACTORS
    assert [s["saved_bytes"] for s in stats] == [0] * ACTORS
    assert peak <= ACTORS  # never more than one step's entries alive
    assert sum(s["steps_aborted"] for s in stats) >= 33 * ACTORS
    for p in procs:
        p.call("zero_grads")


def test_inference_forward_saves_nothing_and_needs_no_backward(servers):
    procs, _ = servers
    local, experts = build(CONTIGUOUS, seed=3)
    deploy(servers, experts, CONTIGUOUS)
    remote = remote_layer(local, servers, CONTIGUOUS)
    x = torch.randn(8, D)
    with torch.no_grad():
        y, _ = remote(x, StepContext(1))
        assert_close(y, local(x)[0])
    remote(x, StepContext(1))  # grad mode on, but the token copies do not require grad (only the router's weights do)
    assert all(p.call("saved_keys") == [] for p in procs)
    assert sum(sum(p.call("stats")["requests"].values()) for p in procs) > 0


def test_stale_placement_is_rejected_and_backward_uses_the_forward_actors(servers):
    procs, clients = servers
    local, experts = build(CONTIGUOUS, seed=4)
    deploy(servers, experts, CONTIGUOUS)
    remote = remote_layer(local, servers, CONTIGUOUS)
    x = torch.randn(16, D, requires_grad=True)
    y, _ = remote(x, StepContext(3))
    # a placement refresh between forward and backward must not redirect this step's backward
    remote.dispatcher.refresh_placement(CONTIGUOUS, list(reversed(clients)))
    y.sum().backward()
    assert x.grad is not None and all(p.call("saved_keys") == [] for p in procs)

    newer = CONTIGUOUS.with_replicas(CONTIGUOUS.replicas)  # version 1; servers are still at version 0
    remote.dispatcher.refresh_placement(newer, clients)
    with pytest.raises(ExpertCallError) as info:
        remote(torch.randn(16, D), StepContext(4))
    err = info.value
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "routed with placement version 1 but this server is at version 0" in str(err)
    assert f"layer {LAYER}, step 4" in str(err)
    for p in procs:
        p.call("zero_grads")


def test_dispatcher_guards():
    clients = [ExpertClient("127.0.0.1:1", TOKEN, 1.0) for _ in range(ACTORS)]
    disp = RemoteDispatcher(LAYER, CONTIGUOUS, clients)
    plan = DispatchPlan.build(torch.tensor([[0, 1]]), CONTIGUOUS, LAYER)
    with pytest.raises(ValueError, match=r"RemoteDispatcher \(layer 1\): forward needs ctx = StepContext"):
        disp(torch.randn(2, D), plan)
    with pytest.raises(ValueError, match="plan is for layer 0"):
        disp(torch.randn(2, D), DispatchPlan.build(torch.tensor([[0, 1]]), CONTIGUOUS, 0), StepContext(0))
    with pytest.raises(ValueError, match=r"StepContext\(-1, 0\): expected non-negative"):
        StepContext(-1)
    with pytest.raises(ValueError, match="got 3 clients: placement has 4 actors"):
        RemoteDispatcher(LAYER, CONTIGUOUS, clients[:3])
    with pytest.raises(ValueError, match="wire_dtype"):
        RemoteDispatcher(LAYER, CONTIGUOUS, clients, wire_dtype=torch.int32)
    for c in clients:
        c.close()
