"""Two-batch overlap over gRPC: a tiny model whose MoE layers are RemoteDispatchers to expert servers in separate
processes, run as two pipelined halves (RemoteDispatcher.start: the exchange in flight while the other half
computes, in forward and backward), against the in-process model on the whole micro-batch: loss, every dense
grad, and the expert weight grads read back from the servers (replicas summed)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from moe_runtime.config import parse_config
from moe_runtime.dispatch.client import ExpertClient
from moe_runtime.dispatch.remote import RemoteDispatcher
from moe_runtime.model.moe_layer import StepContext
from moe_runtime.model.transformer import build_model, expert_param_name
from moe_runtime.model.two_batch import two_batch_loss
from moe_runtime.placement import Placement
from moe_runtime.runtime.expert_shards import sum_replica_grads
from tests.dispatch.servers import start_servers, stop_servers

TOKEN = "two-batch-token"
ACTORS = 3
CFG = parse_config({"model": {"preset": "tiny", "aux_loss_coeff": 0.01}}).model
BASE = Placement.contiguous(CFG.num_layers, CFG.num_experts, ACTORS)
# expert 0 of layer 1 on every actor: the halves' copies of it split over replicas differently than the whole's
REPLICATED = BASE.with_replicas((BASE.replicas[0], ((0, 1, 2),) + BASE.replicas[1][1:]))


@pytest.fixture(scope="module")
def servers():
    procs = start_servers(ACTORS, auth_token=TOKEN, threads=4, start_timeout=90)
    clients = [ExpertClient(p.address, TOKEN, deadline_s=20.0) for p in procs]
    yield procs, clients
    for c in clients:
        c.close()
    stop_servers(procs)


def _deploy(procs, oracle, placement):
    sd = oracle.state_dict()
    for actor, proc in enumerate(procs):
        shards = {(layer, e): (sd[expert_param_name(layer, "w1")][e].clone(),
                               sd[expert_param_name(layer, "w2")][e].clone())
                  for layer, e in placement.shards_of(actor)}  # fmt: skip
        proc.call("load", shards, replace=True)
        proc.call("set_placement_version", placement.version)


def _remote_model(oracle, placement, clients):
    model = build_model(CFG, seed=5, dispatcher_factory=lambda i: RemoteDispatcher(i, placement, clients))
    dense = {k: v for k, v in oracle.state_dict().items() if ".moe.dispatcher.experts." not in k}
    model.load_state_dict(dense, strict=True)
    return model


@pytest.mark.parametrize("placement", [BASE, REPLICATED], ids=["contiguous", "replicated"])
def test_two_batch_remote_equals_in_process(servers, placement):
    procs, clients = servers
    oracle = build_model(CFG, seed=5)
    _deploy(procs, oracle, placement)
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, CFG.vocab_size, (4, 32), generator=g)
    targets = torch.randint(0, CFG.vocab_size, (4, 32), generator=g)

    loss, ce = oracle.loss(tokens, targets)
    loss.backward()
    remote = _remote_model(oracle, placement, clients)
    for step in range(2):  # a second step: the first one's saved activations were freed by backward
        remote.zero_grad(set_to_none=True)
        for p in procs:
            p.call("zero_grads")
        out = two_batch_loss(remote, tokens, targets, StepContext(step, 1))
        out.loss.backward()
        assert_close(out.loss, loss)
        assert_close(out.ce, ce)
        assert torch.equal(out.load_le, oracle.expert_load())
        oracle_params = dict(oracle.named_parameters())
        for k, p in remote.named_parameters():
            assert_close(p.grad, oracle_params[k].grad, msg=k)
        summed = sum_replica_grads([p.call("grads") for p in procs], placement)
        for (layer, e), (g1, g2) in summed.items():
            assert_close(g1, oracle_params[expert_param_name(layer, "w1")].grad[e], msg=f"{layer} {e}")
            assert_close(g2, oracle_params[expert_param_name(layer, "w2")].grad[e])
        assert all(p.call("summary").saved_entries == 0 for p in procs)  # every half's activations consumed


def test_start_without_grad_keeps_nothing(servers):
    procs, clients = servers
    oracle = build_model(CFG, seed=5)
    _deploy(procs, oracle, BASE)
    remote = _remote_model(oracle, BASE, clients)
    tokens = torch.randint(0, CFG.vocab_size, (2, 16))
    with torch.no_grad():
        out = two_batch_loss(remote, tokens, tokens, StepContext(9))
        ref, _ = oracle.loss(tokens, tokens)
    assert_close(out.loss, ref)
    assert all(p.call("summary").saved_entries == 0 for p in procs)
