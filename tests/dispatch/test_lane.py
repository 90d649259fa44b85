"""The TCP lane (dispatch/lane.py) against the gRPC path of the same ExpertServer: the same replies bit for bit,
concurrent calls, and every bad input the lane can meet answered with a named error while the server goes on."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading

import grpc
import pytest
import torch

from moe_runtime.dispatch.client import ExpertClient
from moe_runtime.dispatch.codec import decode_frame
from moe_runtime.dispatch.lane import LaneClient, LaneError
from moe_runtime.dispatch.server import ExpertServer
from moe_runtime.runtime.expert_shards import ExpertShards
from tests.dispatch.helpers import TOKEN, D, call_code, dispatch_frame, make_shards

KEYS = [(0, 0), (0, 1), (0, 2)]


@pytest.fixture
def server():
    shards = ExpertShards()
    shards.load(make_shards(KEYS))
    srv = ExpertServer(shards, auth_token=TOKEN, max_message_bytes=1 << 20, max_frame_bytes=64 << 20)
    srv.start()
    yield srv
    srv.stop()


def frame(rows=(3, 2, 4), step=0, seed=0, meta=None):
    x = torch.randn(sum(rows), D, generator=torch.Generator().manual_seed(seed))
    return dispatch_frame([0, 1, 2][: len(rows)], list(rows), x, step=step, meta=meta or {"save": False})


def raw_connection(srv: ExpertServer, token: bytes = TOKEN.encode()) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.lane_port), timeout=10)
    s.sendall(struct.pack("<4sIII", b"MOEH", 1, len(token), 0) + token)
    return s


def read_reply(s: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 16:
        chunk = s.recv(16 - len(head))
        assert chunk, "connection closed before a reply"
        head += chunk
    magic, code, n = struct.unpack("<4sB3xQ", head)
    assert magic == b"MOER"
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    return code, body


def closed(s: socket.socket) -> bool:
    s.settimeout(5)
    return s.recv(1) == b""


def test_lane_replies_equal_grpc_replies_bit_for_bit(server):
    with ExpertClient(server.address, TOKEN) as g, ExpertClient(server.address, TOKEN, lane=True) as t:
        for step, rows in enumerate([(3, 2, 4), (1,), (64, 0, 7)]):
            f = frame(rows, step=step, seed=step)
            a, b = g.dispatch(f, wait=True).result(), t.dispatch(f, wait=True).result()
            assert bytes(a) == bytes(b)
            assert decode_frame(b).header.step == step
        assert t._lane is not None and g._lane is None  # the second really used the lane
    assert server.stats()["requests"]["dispatch"] == 6


def test_training_forward_and_backward_over_the_lane_equal_grpc(server):
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(9, D, generator=torch.Generator().manual_seed(2))
    out = {}
    for lane, src in ((False, 0), (True, 1)):  # src keys each client's saved activations apart
        with ExpertClient(server.address, TOKEN, lane=lane) as c:
            y = c.dispatch(dispatch_frame([0, 1, 2], [3, 2, 4], x, step=3, meta={"src": src}), wait=True).result()
            dx = c.backward(dispatch_frame([0, 1, 2], [3, 2, 4], dy, step=3, meta={"src": src}, kind="backward",
                                           name="dy"), wait=True).result()  # fmt: skip
            out[lane] = (bytes(y), bytes(dx))
    assert out[False] == out[True]
    assert server.backend.summary().saved_entries == 0  # both backwards consumed their forward's activations


def test_a_frame_over_the_grpc_message_limit_crosses_the_lane_whole(server):
    rows = (3 << 20) // (D * 4)  # 3 MiB of rows, the server's gRPC messages are limited to 1 MiB
    f = frame((rows, 5, 1), step=1)
    with ExpertClient(server.address, TOKEN, lane=True) as t, \
            ExpertClient(server.address, TOKEN, max_message_bytes=1 << 20) as g:
        assert g.streams(f)
        via_lane = bytes(t.dispatch(f, wait=True).result())
        assert not t.streams(f)  # the lane has no message limit: never chunked
        assert via_lane == bytes(g.dispatch(f, wait=True).result())  # gRPC streams it in chunks


def test_concurrent_calls_from_threads_each_get_their_own_reply(server):
    frames = [frame((1 + i % 5, 2, i % 3), step=i, seed=i) for i in range(24)]
    with ExpertClient(server.address, TOKEN) as g:
        expected = [bytes(g.dispatch(f, wait=True).result()) for f in frames]
    got: dict[int, bytes] = {}
    with ExpertClient(server.address, TOKEN, lane=True) as t:

        def worker(ids):
            for i in ids:
                got[i] = bytes(t.dispatch(frames[i]).result())

        threads = [threading.Thread(target=worker, args=(range(k, 24, 4),)) for k in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert len(t._lane._idle) <= 4  # one connection per call in flight, reused
    assert [got[i] for i in range(24)] == expected


def test_a_malformed_frame_is_refused_by_name_and_the_connection_kept(server):
    with ExpertClient(server.address, TOKEN, lane=True) as t:
        good = frame((2,), step=1)
        t.dispatch(good, wait=True).result()
        bad = bytearray(good)
        bad[0:4] = b"XXXX"  # not a codec frame
        err = call_code(lambda: t.dispatch(bytes(bad), layer=0, step=2, wait=True).result())
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "magic" in err.details
        stale = dispatch_frame([0], [2], torch.randn(2, D), pv=7, meta={"save": False})
        err = call_code(lambda: t.dispatch(stale, wait=True).result())
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION and "placement version 7" in err.details
        sock = t._lane._idle[0]
        assert decode_frame(t.dispatch(good, wait=True).result()).header.step == 1
        assert t._lane._idle == [sock]  # the same connection served all four calls
    assert server.stats()["rejected"] == {"INVALID_ARGUMENT": 1, "FAILED_PRECONDITION": 1}


def test_a_wrong_token_is_refused_and_the_server_goes_on(server):
    lane = LaneClient(f"127.0.0.1:{server.lane_port}", "not-the-token", deadline_s=5.0, max_frame_bytes=1 << 20)
    with pytest.raises(LaneError) as info:
        lane.call("Dispatch", b"\x00" * 32).result()
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and "wrong token" in info.value.details
    lane.close()
    assert server.stats()["rejected"] == {"UNAUTHENTICATED": 1}
    with ExpertClient(server.address, TOKEN, lane=True) as t:
        assert decode_frame(t.dispatch(frame(), wait=True).result()).header.kind == "result"


@pytest.mark.parametrize("case", ["hello-magic", "version", "request-magic", "method", "too-large"])
def test_unreadable_requests_get_a_named_error_then_the_connection_closes(server, case):
    if case == "hello-magic":
        s = socket.create_connection(("127.0.0.1", server.lane_port), timeout=10)
        s.sendall(b"GET / HTTP/1.1\r\n")  # something else entirely
        want, words = grpc.StatusCode.INVALID_ARGUMENT, "hello magic"
    elif case == "version":
        s = socket.create_connection(("127.0.0.1", server.lane_port), timeout=10)
        s.sendall(struct.pack("<4sIII", b"MOEH", 99, 0, 0))
        want, words = grpc.StatusCode.FAILED_PRECONDITION, "lane version 99"
    else:
        s = raw_connection(server)
        assert read_reply(s) == (0, b"")  # hello accepted
        if case == "request-magic":
            s.sendall(struct.pack("<4sB3xQ", b"JUNK", 1, 8) + b"\x00" * 8)
            want, words = grpc.StatusCode.INVALID_ARGUMENT, "request magic"
        elif case == "method":
            s.sendall(struct.pack("<4sB3xQ", b"MOEQ", 9, 8) + b"\x00" * 8)
            want, words = grpc.StatusCode.UNIMPLEMENTED, "method id 9"
        else:
            s.sendall(struct.pack("<4sB3xQ", b"MOEQ", 1, 1 << 40))  # declares 1 TiB: refused before allocating
            want, words = grpc.StatusCode.RESOURCE_EXHAUSTED, "max_frame_bytes"
    code, body = read_reply(s)
    assert code == want.value[0] and words in body.decode(), (code, body)
    assert closed(s)
    s.close()
    with ExpertClient(server.address, TOKEN, lane=True) as t:  # the server goes on
        assert decode_frame(t.dispatch(frame(), wait=True).result()).header.kind == "result"


def test_connections_over_the_limit_are_refused_by_name():
    shards = ExpertShards()
    shards.load(make_shards(KEYS))
    srv = ExpertServer(shards, auth_token=TOKEN)
    srv.start()
    try:
        srv._lane.max_connections = 2
        with ExpertClient(srv.address, TOKEN, lane=True) as a, ExpertClient(srv.address, TOKEN, lane=True) as b:
            a.dispatch(frame(), wait=True).result()
            b.dispatch(frame(), wait=True).result()  # two connections held (each client keeps its idle one)
            with ExpertClient(srv.address, TOKEN, lane=True) as c:
                err = call_code(lambda: c.dispatch(frame(step=3), wait=True).result())
                assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_connections" in err.details
            a.close()  # a connection freed: a new client gets one
            for _ in range(100):
                if len(srv._lane._conns) < 2:
                    break
                threading.Event().wait(0.05)
            with ExpertClient(srv.address, TOKEN, lane=True) as d:
                assert decode_frame(d.dispatch(frame(), wait=True).result()).header.kind == "result"
    finally:
        srv.stop()


def test_an_idle_connection_the_server_closed_is_replaced_not_failed(server):
    with ExpertClient(server.address, TOKEN, lane=True) as t:
        t.dispatch(frame(), wait=True).result()
        for conn in list(server._lane._conns):  # the server side of the idle pooled connection goes away
            conn.shutdown(socket.SHUT_RDWR)
        for _ in range(100):
            if not server._lane._conns:
                break
            threading.Event().wait(0.02)
        assert decode_frame(t.dispatch(frame(step=2), wait=True).result()).header.step == 2  # a new connection
    assert server.stats()["rejected"] == {}


def test_a_peer_that_hangs_up_mid_request_costs_nothing(server):
    s = raw_connection(server)
    read_reply(s)
    s.sendall(struct.pack("<4sB3xQ", b"MOEQ", 1, 4096) + b"\x00" * 100)  # 100 of 4096 bytes, then gone
    s.close()
    with ExpertClient(server.address, TOKEN, lane=True) as t:
        assert decode_frame(t.dispatch(frame(), wait=True).result()).header.kind == "result"
    assert server.stats()["requests"]["dispatch"] == 1 and server.stats()["rejected"] == {}


def test_stopped_server_and_closed_client_are_named(server):
    t = ExpertClient(server.address, TOKEN, deadline_s=3.0, lane=True)
    t.dispatch(frame(), wait=True).result()
    server.stop()
    err = call_code(lambda: t.dispatch(frame(step=4), wait=True).result())
    assert err.code == grpc.StatusCode.UNAVAILABLE and "(layer 0, step 4)" in str(err)
    t.close()
    lane = t._lane
    with pytest.raises(LaneError) as info:
        lane.call("Dispatch", b"").result()
    assert info.value.code == grpc.StatusCode.CANCELLED


def test_a_server_without_a_lane_is_reached_over_grpc():
    shards = ExpertShards()
    shards.load(make_shards(KEYS))
    with ExpertServer(shards, auth_token=TOKEN, lane=False) as srv, ExpertClient(srv.address, TOKEN, lane=True) as t:
        assert srv.lane_port == 0
        assert decode_frame(t.dispatch(frame(), wait=True).result()).header.kind == "result"
        assert t._lane is None and not t.uses_lane()


_OMP_PROBE = """
import os, threading, torch
torch.set_num_threads(1)
from moe_runtime.dispatch.lane import init_compute_thread
a, b = torch.randn(512, 512), torch.randn(512, 512)
grown = {}
def run(init):
    if init:
        init_compute_thread()
    before = len(os.listdir("/proc/self/task"))
    a @ b  # a thread's first op an MKL sgemm, as in a lane connection or gRPC worker thread
    grown[init] = len(os.listdir("/proc/self/task")) - before
for init in (True, False):
    t = threading.Thread(target=run, args=(init,))
    t.start()
    t.join()
print(grown[True], grown[False])
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_a_fresh_compute_thread_keeps_the_process_thread_count():
    """Without init_compute_thread, a new thread's first matmul starts an OpenMP team of one thread per core (the
    60x slowdown of tiny experts on the lane before the fix); with it, no thread is started."""
    env = {**os.environ, "MKL_DYNAMIC": "FALSE"}  # MKL's dynamic mode may pick 1 thread on a loaded machine, hiding it
    out = subprocess.run([sys.executable, "-c", _OMP_PROBE], capture_output=True, text=True, timeout=120, check=True,
                         env=env)  # fmt: skip
    with_init, without = map(int, out.stdout.split())
    assert with_init == 0
    if without == 0:  # this machine's MKL ran the uninitialised thread's matmul without a team: nothing to compare
        pytest.skip("MKL started no OpenMP team for an uninitialised thread here (1 core or OMP_NUM_THREADS=1?)")


def test_a_frame_over_the_lane_limit_is_named_and_the_next_call_gets_a_fresh_connection():
    shards = ExpertShards()
    shards.load(make_shards(KEYS))
    with ExpertServer(shards, auth_token=TOKEN, max_frame_bytes=4096) as srv, \
            ExpertClient(srv.address, TOKEN, lane=True) as t:
        err = call_code(lambda: t.dispatch(frame((100,)), wait=True).result())  # 6.4 KB of rows
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_frame_bytes 4096" in err.details
        assert t._lane._idle == []  # the server closed that connection: not kept for the next call
        assert decode_frame(t.dispatch(frame((2,)), wait=True).result()).header.kind == "result"


def test_a_call_without_layer_and_step_is_named_from_its_frame_parts():
    """RemoteDispatcher sends lane frames as parts (codec.encode_frame_parts); an error names the frame's own layer
    and step when the caller gave none, also when the server cannot be asked for its lane at all."""
    from moe_runtime.dispatch.codec import encode_frame_parts
    from moe_runtime.dispatch.envelope import envelope_prefix

    parts = encode_frame_parts("dispatch", layer=0, step=9, mb=0, pv=7, experts=[0], counts=[2],
                               tensors={"x": torch.randn(2, D)}, lead=envelope_prefix)  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens here
    with ExpertClient(dead, TOKEN, deadline_s=2.0, lane=True) as t:
        err = call_code(lambda: t.call("Dispatch", parts, wrapped=True, wait=True).result())
    assert err.code == grpc.StatusCode.UNAVAILABLE and "(layer 0, step 9)" in str(err)
