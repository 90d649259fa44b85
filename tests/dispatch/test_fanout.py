"""fan_out: replies in request order, the lone-call path, and the failed server named within the deadline."""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from torch.testing import assert_close

from moe_runtime.dispatch.client import ExpertCallError, ExpertClient
from moe_runtime.dispatch.codec import decode_frame
from moe_runtime.dispatch.fanout import fan_out
from moe_runtime.dispatch.server import ExpertServer
from moe_runtime.model.experts import swiglu
from moe_runtime.runtime.expert_shards import ExpertShards
from tests.dispatch.helpers import TOKEN, D, dispatch_frame, make_shards


def test_fan_out_returns_replies_in_order_and_names_the_failed_server():
    shards = make_shards([(0, 0), (0, 1)])
    servers = [ExpertServer(ExpertShards(shards), auth_token=TOKEN) for _ in range(3)]
    clients = []
    try:
        for srv in servers:
            srv.start()
            clients.append(ExpertClient(srv.address, TOKEN, deadline_s=5.0))
        xs = [torch.randn(n, D) for n in (2, 3, 4)]
        requests = [(c, "Dispatch", dispatch_frame([i % 2], [len(x)], x, step=6), 0, 6)
                    for i, (c, x) in enumerate(zip(clients, xs))]  # fmt: skip
        replies = fan_out(requests)
        for i, (reply, x) in enumerate(zip(replies, xs)):
            assert_close(decode_frame(reply).tensors["y"], swiglu(x, *shards[(0, i % 2)]))
        assert len(fan_out(requests[:1])) == 1  # the lone-call path
        servers[1].stop(0)
        t0 = time.monotonic()
        with pytest.raises(ExpertCallError) as info:
            fan_out(requests)
        assert time.monotonic() - t0 < 5.5
        assert info.value.address == servers[1].address and info.value.code == grpc.StatusCode.UNAVAILABLE
        assert "Dispatch (layer 0, step 6)" in str(info.value)
    finally:
        for c in clients:
            c.close()
        for srv in servers:
            srv.stop(0)
