"""Hostile clients against ExpertServer: malformed Health / EndStep bodies are INVALID_ARGUMENT (grpc's own
deserializer answered INTERNAL), and an unauthenticated call is refused from its metadata before its body is
read, so large unauthenticated requests do not grow the server."""

from __future__ import annotations

import threading

import grpc
import pytest

from moe_runtime.dispatch.client import ExpertClient
from moe_runtime.dispatch.proto import expert_pb2 as pb
from moe_runtime.dispatch.server import ExpertServer
from moe_runtime.dispatch.service import METHOD_DISPATCH, METHOD_END_STEP, METHOD_HEALTH, TOKEN_METADATA_KEY
from moe_runtime.runtime.expert_shards import ExpertShards
from tests.dispatch.helpers import TOKEN, make_shards
from tests.dispatch.servers import ServerProcess

GOOD = ((TOKEN_METADATA_KEY, TOKEN),)
# bytes that are no protobuf message: a field tag with wire type 7 (invalid), a truncated varint, a length past end
MALFORMED = [b"\x0f", b"\x08\xff\xff", b"\x0a\x7fabc"]


@pytest.fixture
def server():
    srv = ExpertServer(ExpertShards(make_shards([(0, 0)])), auth_token=TOKEN, threads=2)
    srv.start()
    yield srv
    srv.stop(0)


@pytest.mark.parametrize("method", [METHOD_HEALTH, METHOD_END_STEP])
@pytest.mark.parametrize("body", MALFORMED)
def test_malformed_control_request_is_invalid_argument_and_the_server_goes_on(server, method, body):
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary(method)
        with pytest.raises(grpc.RpcError) as info:
            raw(body, timeout=10, metadata=GOOD)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        name = "HealthRequest" if method == METHOD_HEALTH else "EndStepRequest"
        assert f"not a serialized {name}" in info.value.details()
        # a well-formed request of the same method still works
        ok = raw(pb.HealthRequest().SerializeToString() if method == METHOD_HEALTH
                 else pb.EndStepRequest(step=3).SerializeToString(), timeout=10, metadata=GOOD)  # fmt: skip
        assert isinstance(ok, bytes)
    with ExpertClient(server.address, TOKEN, 10.0) as c:
        assert c.health().ok
    assert server.stats()["rejected"] == {"INVALID_ARGUMENT": 1}


def test_unauthenticated_call_is_refused_before_its_body_is_read():
    """4 concurrent 64 MiB requests with a wrong token: each UNAUTHENTICATED, and the server process grows by far
    less than one of them (before: each message was received whole before the token check)."""
    import ray  # noqa: F401  (ray ships psutil, which ServerProcess.rss uses)

    payload = bytes(64 << 20)
    with ServerProcess(auth_token=TOKEN, shards=make_shards([(0, 0)]), max_message_bytes=256 << 20) as proc:
        with grpc.insecure_channel(proc.address, options=[("grpc.max_send_message_length", 256 << 20)]) as channel:
            raw = channel.unary_unary(METHOD_DISPATCH)
            pb.HealthReply.FromString(channel.unary_unary(METHOD_HEALTH)(b"", timeout=10, metadata=GOOD))  # warm
            rss0 = proc.rss()
            codes: list = []

            def attack() -> None:
                try:
                    raw(payload, timeout=60, metadata=((TOKEN_METADATA_KEY, "wrong"),))
                except grpc.RpcError as err:
                    codes.append((err.code(), err.details()))

            threads = [threading.Thread(target=attack) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            rss1 = proc.rss()
        stats = proc.call("stats")
    assert [c for c, _ in codes] == [grpc.StatusCode.UNAUTHENTICATED] * 4, codes
    assert all("wrong token" in d for _, d in codes)
    assert stats["rejected"].get("UNAUTHENTICATED") == 4 and stats["bytes_in"] == 0
    assert rss1 - rss0 < 32 << 20, f"server grew {(rss1 - rss0) >> 20} MiB for 4 refused 64 MiB requests"
