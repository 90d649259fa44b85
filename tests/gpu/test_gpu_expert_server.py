"""ExpertServer over ExpertShards on a device, reached by a RemoteDispatcher whose tensors live on a device, against
the in-process CPU layer (LocalDispatcher): outputs, input grads, router grads, expert weight grads.

The "cpu" parameters run the very same calls with device="cpu" (every CI run); the "cuda" ones need a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from moe_runtime.dispatch.client import ExpertClient
from moe_runtime.dispatch.remote import RemoteDispatcher
from moe_runtime.dispatch.server import ExpertServer
from moe_runtime.model.device import ComputeDevice
from moe_runtime.model.experts import SwiGLUExperts
from moe_runtime.model.moe_layer import LocalDispatcher, MoELayer, StepContext
from moe_runtime.model.router import AttentionRouter
from moe_runtime.placement import Placement
from moe_runtime.runtime.expert_shards import ExpertShards, sum_replica_grads
from tests.gpu.gpu_marks import GPU

TOKEN = "gpu-server-token"
E, D, FF, K, ACTORS, LAYER = 8, 32, 64, 2, 2, 0
PLACEMENT = Placement.contiguous(1, E, ACTORS)

CASES = [
    pytest.param("cpu", "cpu", "fp32", torch.float32, id="cpu-cpu"),
    pytest.param("cpu", "cpu", "fp32", torch.bfloat16, id="cpu-cpu-bf16-wire"),
    pytest.param("cuda", "cuda", "fp32", torch.float32, id="cuda-cuda", marks=GPU),
    pytest.param("cpu", "cuda", "fp32", torch.float32, id="cpu-client-cuda-server", marks=GPU),
    pytest.param("cuda", "cpu", "fp32", torch.float32, id="cuda-client-cpu-server", marks=GPU),
    pytest.param("cuda", "cuda", "bf16", torch.bfloat16, id="cuda-bf16", marks=GPU),
]


def _build():
    torch.manual_seed(0)
    router = AttentionRouter(D, E, K, init_std=0.5)
    experts = SwiGLUExperts(E, D, FF, init_std=0.2)
    return MoELayer(router, LocalDispatcher(experts, PLACEMENT, num_layers=1), layer_index=LAYER), experts


def _checker(fp32: bool, all_cpu: bool):
    """fp32 on the CPU: assert_close's default fp32 tolerance (as tests/dispatch); fp32 with a GPU: CUDA kernels
    round differently; bf16 compute or wire: relative error of the whole tensor within bf16 rounding."""

    def check(actual: torch.Tensor, expected: torch.Tensor) -> None:
        if fp32:
            assert_close(actual, expected, **({} if all_cpu else {"rtol": 1e-4, "atol": 1e-5}))
            return
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
        rel = float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-12))
        assert rel < 2e-2, f"relative error {rel:.3g} >= 2e-2 (bf16)"

    return check


@pytest.mark.parametrize(("client_dev", "server_dev", "precision", "wire"), CASES)
def test_remote_layer_on_device_matches_cpu(client_dev, server_dev, precision, wire):
    local, experts = _build()
    compute = ComputeDevice.resolve(server_dev, precision)
    shards = [ExpertShards({k: (experts.w1[k[1]].detach(), experts.w2[k[1]].detach())
                            for k in PLACEMENT.shards_of(a)}, PLACEMENT.version, device=compute)
              for a in range(ACTORS)]  # fmt: skip
    servers = [ExpertServer(s, auth_token=TOKEN, threads=2) for s in shards]
    clients = [ExpertClient(srv.start(), TOKEN, deadline_s=30.0) for srv in servers]
    try:
        assert all(w.device.type == server_dev for s in shards for pair in s.weights().values() for w in pair)
        remote = MoELayer(copy.deepcopy(local.router).to(client_dev),
                          RemoteDispatcher(LAYER, PLACEMENT, clients, wire_dtype=wire), layer_index=LAYER)
        x, g = torch.randn(2, 40, D), torch.randn(2, 40, D)
        x_loc, x_rem = x.clone().requires_grad_(), x.to(client_dev).requires_grad_()
        y_loc, _ = local(x_loc)
        y_rem, _ = remote(x_rem, StepContext(3, 0))
        assert y_rem.device.type == client_dev
        check = _checker(precision == "fp32" and wire == torch.float32, client_dev == server_dev == "cpu")
        check(y_rem.detach().cpu(), y_loc.detach())
        (y_loc * g).sum().backward()
        (y_rem * g.to(client_dev)).sum().backward()
        check(x_rem.grad.cpu(), x_loc.grad)
        for p_rem, p_loc in zip(remote.router.parameters(), local.router.parameters()):
            check(p_rem.grad.cpu(), p_loc.grad)
        grads = [{k: tuple(t.cpu() for t in v) for k, v in s.grads().items()} for s in shards]
        assert all(t.device.type == server_dev for s in shards for pair in s.grads().values() for t in pair)
        assert all(t.dtype == torch.float32 for s in shards for pair in s.grads().values() for t in pair)
        summed = sum_replica_grads(grads, PLACEMENT)
        for e in range(E):
            check(summed[(LAYER, e)][0], experts.w1.grad[e])
            check(summed[(LAYER, e)][1], experts.w2.grad[e])
        assert all(s.saved_keys() == [] for s in shards)  # backward consumed every saved activation
    finally:
        for c in clients:
            c.close()
        for srv in servers:
            srv.stop(0)
