"""ExpertServer over ExpertShards, through ExpertClient: math, state over RPC, auth, placement version, frame
checks and fuzzing.

Most tests run the server in this process (fast); the fuzz test runs it in a separate OS process
(tests/dispatch/servers.py), because it measures the server process (RSS).
"""

from __future__ import annotations

import threading
import time

import grpc
import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from moe_runtime.dispatch.client import ExpertClient
from moe_runtime.dispatch.codec import ALIGNMENT, MAGIC, decode_frame
from moe_runtime.dispatch.envelope import unwrap_frame, wrap_frame
from moe_runtime.dispatch.proto import expert_pb2 as pb
from moe_runtime.dispatch.proto import expert_pb2_grpc
from moe_runtime.dispatch.server import ExpertServer
from moe_runtime.dispatch.service import TOKEN_METADATA_KEY
from moe_runtime.model.experts import swiglu
from moe_runtime.runtime.expert_shards import ExpertShards
from tests.dispatch.helpers import FF, TOKEN, D, call_code, dispatch_frame, make_shards
from tests.dispatch.servers import ServerProcess


@pytest.fixture
def shards():
    return ExpertShards(make_shards([(0, 0), (0, 1), (0, 2), (1, 0)]))


@pytest.fixture
def server(shards):
    srv = ExpertServer(shards, auth_token=TOKEN, threads=4)
    srv.start()
    yield srv
    srv.stop(0)


@pytest.fixture
def client(server):
    with ExpertClient(server.address, TOKEN, deadline_s=10.0) as c:
        yield c


def test_generated_stub_interoperates_with_the_raw_bytes_server(server, shards):
    """The .proto is the contract: a client generated from it (protobuf Frame, no pad) gets served."""
    x = torch.randn(5, D)
    frame = dispatch_frame([1], [5], x)
    with grpc.insecure_channel(server.address) as channel:
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        reply = stub.Dispatch(pb.Frame(data=frame), timeout=10, metadata=((TOKEN_METADATA_KEY, TOKEN),))
        health = stub.Health(pb.HealthRequest(), timeout=10, metadata=((TOKEN_METADATA_KEY, TOKEN),))
    y = decode_frame(reply.data, expected_kind="result").tensors["y"]
    w1, w2 = shards.weights()[(0, 1)]
    assert_close(y, swiglu(x, w1, w2))
    assert health.ok and health.num_shards == 4 and health.saved_entries == 1


# ------------------------------------------------------------------------------------------------ math


def test_dispatch_and_backward_match_autograd(server, client, shards):
    torch.manual_seed(1)
    experts, counts = [0, 2, 1], [3, 5, 4]
    x = torch.randn(12, D)
    dy = torch.randn(12, D)
    y_frame = decode_frame(client.dispatch(dispatch_frame(experts, counts, x, step=3, mb=1)).result())
    dx_frame = decode_frame(
        client.backward(dispatch_frame(experts, counts, dy, step=3, mb=1, kind="backward", name="dy")).result()
    )
    assert (y_frame.header.kind, dx_frame.header.kind) == ("result", "grad")
    assert (y_frame.header.step, y_frame.header.mb, list(y_frame.header.counts)) == (3, 1, counts)

    weights = {k: (w1.clone().requires_grad_(), w2.clone().requires_grad_()) for k, (w1, w2) in
               shards.weights().items()}  # fmt: skip
    xr = x.clone().requires_grad_()
    ys, start = [], 0
    for e, n in zip(experts, counts):
        ys.append(swiglu(xr[start : start + n], *weights[(0, e)]))
        start += n
    y_ref = torch.cat(ys)
    y_ref.backward(dy)
    assert_close(y_frame.tensors["y"], y_ref)
    assert_close(dx_frame.tensors["dx"], xr.grad)
    grads = shards.grads()
    for e in experts:
        assert_close(grads[(0, e)][0], weights[(0, e)][0].grad)
        assert_close(grads[(0, e)][1], weights[(0, e)][1].grad)
    assert grads[(1, 0)][0].abs().sum() == 0  # untouched shard
    assert shards.saved_keys() == []  # backward consumed the activations
    shards.zero_grads()
    assert all(g1.abs().sum() == 0 and g2.abs().sum() == 0 for g1, g2 in shards.grads().values())


def test_reply_keeps_the_wire_dtype(client, server, shards):
    x = torch.randn(6, D)
    reply = decode_frame(client.dispatch(dispatch_frame([0], [6], x, wire=torch.bfloat16)).result(), out_dtype=None)
    y = reply.tensors["y"]
    assert y.dtype == torch.bfloat16
    w1, w2 = shards.weights()[(0, 0)]
    # bf16 has an 8-bit mantissa: the input rounding (2**-9 relative) propagates through two matmuls
    assert_close(y.float(), swiglu(x, w1, w2), rtol=2e-2, atol=2e-2)


def test_concurrent_calls_accumulate_every_weight_grad(server, shards):
    """8 threads x (dispatch + backward) on the same experts with distinct keys: grads must add up exactly."""
    xs = [torch.randn(4, D) for _ in range(8)]
    dys = [torch.randn(4, D) for _ in range(8)]
    errors = []

    def work(i):
        try:
            with ExpertClient(server.address, TOKEN, 10.0) as c:
                c.dispatch(dispatch_frame([0, 1], [2, 2], xs[i], mb=i, meta={"src": i % 2})).result()
                c.backward(dispatch_frame([0, 1], [2, 2], dys[i], mb=i, meta={"src": i % 2}, kind="backward",
                                          name="dy")).result()  # fmt: skip
        except Exception as e:  # noqa: BLE001  (surfaced by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    x, dy = torch.cat(xs), torch.cat(dys)
    w = {k: (a.clone().requires_grad_(), b.clone().requires_grad_()) for k, (a, b) in shards.weights().items()}
    rows0 = torch.cat([torch.arange(4 * i, 4 * i + 2) for i in range(8)])
    rows1 = rows0 + 2
    y0, y1 = swiglu(x[rows0], *w[(0, 0)]), swiglu(x[rows1], *w[(0, 1)])
    torch.autograd.backward([y0, y1], [dy[rows0], dy[rows1]])
    grads = shards.grads()
    for k in [(0, 0), (0, 1)]:
        assert_close(grads[k][0], w[k][0].grad)
        assert_close(grads[k][1], w[k][1].grad)
    assert shards.expert_token_counts() == {(0, 0): 16, (0, 1): 16}
    assert shards.expert_token_counts(reset=True) == {(0, 0): 16, (0, 1): 16}
    assert shards.expert_token_counts() == {}


# ------------------------------------------------------------------------------------------------ state


def test_saved_activations_are_keyed_and_freed(server, client, shards):
    x = torch.randn(4, D)
    for step in range(3):
        for mb in range(2):
            client.dispatch(dispatch_frame([0], [4], x, step=step, mb=mb, meta={"src": 1})).result()
    client.dispatch(dispatch_frame([0], [4], x, step=9, meta={"save": False})).result()  # inference: not kept
    assert shards.saved_keys() == [(s, m, 0, 1) for s in range(3) for m in range(2)]
    per_entry = shards.stats()["saved_bytes"] // 6
    assert shards.end_step(0) == (2, 2 * per_entry)
    reply = client.end_step(1)  # the RPC does the same
    assert (reply.freed_entries, reply.freed_bytes) == (2, 2 * per_entry)
    assert shards.abort_step(2) == (2, 2 * per_entry)
    assert shards.saved_keys() == [] and shards.stats()["saved_bytes"] == 0
    assert shards.stats()["steps_aborted"] == 1
    # a forward retried with the same key replaces the saved entry (forward is idempotent)
    client.dispatch(dispatch_frame([0], [4], x, step=4)).result()
    client.dispatch(dispatch_frame([0], [4], x, step=4)).result()
    assert shards.saved_keys() == [(4, 0, 0, 0)] and shards.stats()["overwritten"] == 1


def test_backward_is_not_replayed_and_must_match_the_forward(server, client, shards):
    x = torch.randn(6, D)
    client.dispatch(dispatch_frame([0, 1], [3, 3], x, step=2)).result()
    bad = call_code(lambda: client.backward(
        dispatch_frame([0, 1], [4, 2], x, step=2, kind="backward", name="dy")).result())  # fmt: skip
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "do not match the forward" in bad.details
    client.backward(dispatch_frame([0, 1], [3, 3], x, step=2, kind="backward", name="dy")).result()
    g_once = {k: (a.clone(), b.clone()) for k, (a, b) in shards.grads().items()}
    err = call_code(lambda: client.backward(
        dispatch_frame([0, 1], [3, 3], x, step=2, kind="backward", name="dy")).result())  # fmt: skip
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "no saved forward for step 2, micro-batch 0, layer 0, src 0" in err.details
    assert (err.address, err.layer, err.step) == (server.address, 0, 2)
    for k, (a, b) in shards.grads().items():  # the replay added nothing
        assert torch.equal(a, g_once[k][0]) and torch.equal(b, g_once[k][1])


def test_shards_load_drop_and_hosted_check(server, client, shards):
    x = torch.randn(2, D)
    err = call_code(lambda: client.dispatch(dispatch_frame([5], [2], x)).result())
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "experts[0] = (layer 0, expert 5): not hosted by this server" in err.details
    new = make_shards([(0, 5)], seed=3)
    shards.load(new)
    y = decode_frame(client.dispatch(dispatch_frame([5], [2], x)).result()).tensors["y"]
    assert_close(y, swiglu(x, *new[(0, 5)]))
    shards.drop([(0, 5), (0, 0)])
    assert sorted(shards.weights()) == [(0, 1), (0, 2), (1, 0)] and sorted(shards.grads()) == sorted(shards.weights())
    assert "not hosted" in call_code(lambda: client.dispatch(dispatch_frame([0], [2], x)).result()).details
    with pytest.raises(KeyError, match="not hosted"):
        shards.drop([(3, 3)])
    with pytest.raises(ValueError, match=r"expected w1 \[d, 2f\] and w2 \[f, d\]"):
        shards.load({(0, 7): (torch.zeros(D, 2 * FF), torch.zeros(FF + 1, D))})
    shards.load(make_shards([(2, 2)]), replace=True)
    assert list(shards.weights()) == [(2, 2)]


def test_stale_placement_version_is_rejected_with_a_clear_message(server, client, shards):
    x = torch.randn(2, D)
    shards.set_placement_version(3)
    err = call_code(lambda: client.dispatch(dispatch_frame([0], [2], x, pv=2, step=11)).result())
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "placement version 2 but this server is at version 3" in err.details
    assert "layer 0, step 11" in str(err) and server.address in str(err)
    decode_frame(client.dispatch(dispatch_frame([0], [2], x, pv=3)).result())  # still serving
    assert client.health().placement_version == 3


def test_missing_or_wrong_token_is_unauthenticated_and_the_server_goes_on(server, shards):
    x = torch.randn(2, D)
    frame = dispatch_frame([0], [2], x)
    with ExpertClient(server.address, "wrong", 10.0) as bad:
        err = call_code(lambda: bad.dispatch(frame).result())
        assert err.code == grpc.StatusCode.UNAUTHENTICATED and "wrong token" in err.details
        assert call_code(bad.health).code == grpc.StatusCode.UNAUTHENTICATED
        assert call_code(lambda: bad.end_step(0)).code == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(server.address) as channel:
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Dispatch(pb.Frame(data=frame), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "is missing" in info.value.details()
    assert shards.saved_keys() == []  # nothing ran
    with ExpertClient(server.address, TOKEN, 10.0) as good:
        decode_frame(good.dispatch(frame).result())
        assert good.health().rejected == 4
    assert server.stats()["rejected"] == {"UNAUTHENTICATED": 4}


def test_server_side_frame_checks(server, client):
    x = torch.randn(3, D)
    cases = [
        (dispatch_frame([0], [3], torch.randn(3, D + 1)), "hidden 17 but expert (layer 0, expert 0) has hidden 16"),
        (dispatch_frame([0], [3], x, name="q"), "carries exactly one tensor named 'x'"),
        (dispatch_frame([0], [3], x, meta={"src": -1}), "meta['src'] = -1: expected a non-negative int"),
        (dispatch_frame([0], [3], x, meta={"save": 1}), "meta['save'] = 1: expected a bool"),
        (dispatch_frame([0], [3], x, kind="backward", name="x"), "header.kind = 'backward': expected 'dispatch'"),
        (dispatch_frame([0], [3], torch.zeros(3, D, dtype=torch.int32)), "expected float32, float16 or bfloat16"),
        (dispatch_frame([0], [3], x.reshape(3, 4, 4)), "expected [rows, hidden]"),
    ]
    for frame, msg in cases:
        err = call_code(lambda frame=frame: client.dispatch(frame).result())
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and msg in err.details, err
    decode_frame(client.dispatch(dispatch_frame([0], [3], x)).result())


def test_check_finite_rejects_nan():
    with ExpertServer(ExpertShards(make_shards([(0, 0)])), auth_token=TOKEN, check_finite=True) as srv, \
            ExpertClient(srv.address, TOKEN, 10.0) as c:  # fmt: skip
        x = torch.randn(2, D)
        x[1, 3] = float("nan")
        err = call_code(lambda: c.dispatch(dispatch_frame([0], [2], x)).result())
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "has NaN/Inf (check_finite is on)" in err.details


def test_oversize_message_is_rejected_by_the_limit():
    with ExpertServer(ExpertShards(make_shards([(0, 0)])), auth_token=TOKEN, max_message_bytes=64 << 10) as srv, \
            ExpertClient(srv.address, TOKEN, 10.0, max_message_bytes=1 << 20) as c:  # fmt: skip
        err = call_code(lambda: c.dispatch(dispatch_frame([0], [2048], torch.randn(2048, D))).result())
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        decode_frame(c.dispatch(dispatch_frame([0], [4], torch.randn(4, D))).result())


# ------------------------------------------------------------------------------------------------ fuzz

FUZZ_HOSTED = [(0, 0), (0, 1), (0, 2), (2, 1)]
FUZZ_ROWS = 6


def raw_frame(header, payload=b"", *, pad_byte=0, magic=MAGIC, header_bytes=None):
    """Hand-assembled frame (the codec's documented layout), so headers encode_frame refuses can be sent."""
    hb = msgpack.packb(header, use_bin_type=True) if header_bytes is None else header_bytes
    out = bytearray(magic + len(hb).to_bytes(4, "little") + hb)
    out += bytes([pad_byte]) * (-len(out) % ALIGNMENT)
    return bytes(out + payload)


def good_header(rows=FUZZ_ROWS, **over):
    h = {"v": 1, "kind": "dispatch", "layer": 0, "step": 1, "mb": 0, "pv": 0, "experts": [0, 2],
         "counts": [rows - 2, 2],
         "tensors": [{"name": "x", "dtype": "float32", "shape": [rows, D], "nbytes": rows * D * 4}]}  # fmt: skip
    h.update(over)
    return h


PAYLOAD = torch.randn(FUZZ_ROWS, D, generator=torch.Generator().manual_seed(0)).numpy().tobytes()
PAYLOAD_2 = torch.randn(FUZZ_ROWS, D, generator=torch.Generator().manual_seed(1)).numpy().tobytes()


def _spec(**over):
    s = {"name": "x", "dtype": "float32", "shape": [FUZZ_ROWS, D], "nbytes": FUZZ_ROWS * D * 4}
    s.update(over)
    return s


# Each strategy yields (message bytes as sent, substring the INVALID_ARGUMENT details must contain).
_header_mutations = st.sampled_from([
    ({"v": 2}, "header.v = 2: expected format version 1"),
    ({"kind": "result"}, "header.kind = 'result': expected 'dispatch'"),
    ({"kind": "nope"}, "header.kind = 'nope': expected one of"),
    ({"layer": -1}, "header.layer = -1: expected an int in [0, 2**63)"),
    ({"step": "1"}, "header.step = '1': expected a non-negative int, got str"),
    ({"mb": 1.5}, "header.mb = 1.5: expected a non-negative int, got float"),
    ({"pv": None}, "header.pv = None: expected a non-negative int, got NoneType"),
    ({"experts": [0]}, "len(experts) = 1 but len(counts) = 2: expected equal"),
    ({"experts": [0, 0]}, "experts[1] = 0: duplicate of experts[0]"),
    ({"experts": [0, 9]}, "experts[1] = (layer 0, expert 9): not hosted by this server"),
    ({"layer": 1}, "experts[0] = (layer 1, expert 0): not hosted by this server"),
    ({"counts": [1, 2]}, "counts sum to 3: expected 6 rows (tensors[0].shape[0])"),
    ({"counts": "ab"}, "header.counts = 'ab': expected a list of ints, got str"),
    ({"tensors": {}}, "header.tensors = {}: expected a list of tensor specs"),
    ({"tensors": [_spec(dtype="float64")]}, "tensors[0].dtype = 'float64': expected one of"),
    ({"tensors": [_spec(nbytes=5)]}, "but nbytes = 5"),
    ({"tensors": [_spec(shape=[FUZZ_ROWS, D, 1, 1, 1, 1, 1, 1, 1])]}, "has rank 9: expected at most 8"),
    ({"tensors": [_spec(name="")]}, "tensors[0].name = '': expected a str of 1..64 chars"),
    ({"tensors": [_spec(extra=1)]}, "tensors[0] has unknown field(s)"),
    ({"tensors": [_spec(), _spec()]}, "tensors[1].name = 'x': duplicate of tensors[0]"),
    ({"tensors": [_spec(name="q")]}, "carries exactly one tensor named 'x'"),
    ({"tensors": [_spec(shape=[FUZZ_ROWS * 2, D // 2])], "counts": [10, 2]},
     "hidden 8 but expert (layer 0, expert 0) has hidden 16"),
    ({"meta": {"src": "a"}}, "meta['src'] = 'a': expected a non-negative int"),
    ({"meta": {"save": 0}}, "meta['save'] = 0: expected a bool"),
    ({"meta": {1: 2}}, "int is not allowed for map key"),
    ({"meta": {"k": {"a": 1}}}, "meta['k'] = {'a': 1}: expected None, bool, int, float or str"),
    ({"extra": 0}, "header has unknown field 'extra'"),
])  # fmt: skip


@st.composite
def malformed(draw):
    kind = draw(st.sampled_from(["header", "missing", "truncate", "trailing", "padding", "bytes", "envelope",
                                 "prefix", "nan", "msgpack"]))  # fmt: skip
    message, expected = draw(_malformed_of(kind))
    return message, expected, kind


@st.composite
def _malformed_of(draw, kind):
    # a random valid base (step, micro-batch, split of the rows) so every category has many distinct cases
    c0 = draw(st.integers(0, FUZZ_ROWS))
    base = {"step": draw(st.integers(0, 2**40)), "mb": draw(st.integers(0, 63)), "counts": [c0, FUZZ_ROWS - c0]}
    payload = draw(st.sampled_from([PAYLOAD, PAYLOAD_2]))

    def header(**over):
        return good_header(**{**base, **over})

    good = raw_frame(header(), payload)
    if kind == "header":
        over, msg = draw(_header_mutations)
        return wrap_frame(raw_frame(header(**over), payload)), msg
    if kind == "missing":
        field = draw(st.sampled_from(["v", "kind", "layer", "step", "mb", "pv", "experts", "counts", "tensors"]))
        h = header()
        del h[field]
        return wrap_frame(raw_frame(h, payload)), f"header is missing field {field!r}"
    if kind == "truncate":
        cut = draw(st.integers(1, len(payload)))
        return wrap_frame(good[:-cut]), "truncated"
    if kind == "trailing":
        extra = draw(st.binary(min_size=1, max_size=200))
        return wrap_frame(good + extra), f"{len(extra)} trailing bytes"
    if kind == "padding":
        return wrap_frame(raw_frame(header(), payload, pad_byte=draw(st.integers(1, 255)))), "is not zero"
    if kind == "bytes":  # arbitrary bytes in a valid envelope: never the magic
        data = draw(st.binary(max_size=300).filter(lambda b: not b.startswith(MAGIC)))
        return wrap_frame(data), ("too short" if len(data) < 8 else "frame magic")
    if kind == "envelope":  # not a serialized Frame at all
        data = draw(st.sampled_from([b"\x0a\xff\xff\xff\xff\x0f", b"\x0b", b"\x0a", b"\x00\x01",
                                     b"\x0a" + b"\x80" * 12]))  # fmt: skip
        return data + draw(st.binary(max_size=8)), "request is not a serialized Frame message"
    if kind == "prefix":
        hlen = draw(st.integers(len(good) - 7, 2**32 - 1))
        return wrap_frame(MAGIC + hlen.to_bytes(4, "little") + good[8:]), "header length = "
    if kind == "nan":
        bad = bytearray(payload)
        i = draw(st.integers(0, FUZZ_ROWS * D - 1))
        bad[4 * i : 4 * i + 4] = torch.tensor([draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))]
                                              ).numpy().tobytes()  # fmt: skip
        return wrap_frame(raw_frame(header(), bytes(bad))), "has NaN/Inf (check_finite is on)"
    junk = draw(st.binary(min_size=1, max_size=64).filter(lambda b: b[0] in (0xC1, 0xD4, 0xDC, 0xDE, 0x92)
                                                           or len(b) < 2))  # fmt: skip
    try:
        obj = msgpack.unpackb(junk)
    except Exception:  # noqa: BLE001  (msgpack raises several types for junk; any of them means "invalid")
        return wrap_frame(raw_frame(None, payload, header_bytes=junk)), "is not valid msgpack"
    return wrap_frame(raw_frame(None, b"", header_bytes=junk)), ("expected a msgpack map" if not isinstance(
        obj, dict) else "header")  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_server():
    proc = ServerProcess(auth_token=TOKEN, shards=make_shards(FUZZ_HOSTED), check_finite=True)
    proc.wait_ready()
    yield proc
    proc.stop()


def test_fuzz_malformed_frames_are_rejected_and_the_server_goes_on(fuzz_server):
    """>= 1000 malformed frames: each INVALID_ARGUMENT naming its problem; then a valid call succeeds; RSS flat."""
    channel = grpc.insecure_channel(fuzz_server.address)
    raw = channel.unary_unary("/moe_runtime.expert.ExpertService/Dispatch")
    md = ((TOKEN_METADATA_KEY, TOKEN),)
    valid = wrap_frame(raw_frame(good_header(), PAYLOAD))
    for _ in range(300):  # warm up allocator and thread pool before taking the RSS baseline
        raw(valid, timeout=10, metadata=md)
        with pytest.raises(grpc.RpcError):
            raw(b"\x0b", timeout=10, metadata=md)
    fuzz_server.call("end_step", 10)
    rss0 = fuzz_server.rss()
    seen = {"n": 0, "kinds": {}}

    @settings(max_examples=1100, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # fmt: skip
    @given(malformed())
    def run(case):
        message, expected, kind = case
        with pytest.raises(grpc.RpcError) as info:
            raw(message, timeout=10, metadata=md)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert expected in info.value.details(), (expected, info.value.details())
        seen["n"] += 1
        seen["kinds"][kind] = seen["kinds"].get(kind, 0) + 1

    t0 = time.monotonic()
    run()
    elapsed = time.monotonic() - t0
    assert seen["n"] >= 1000, seen
    assert len(seen["kinds"]) == 10 and min(seen["kinds"].values()) >= 20, seen["kinds"]  # every category hit
    y = decode_frame(unwrap_frame(raw(valid, timeout=10, metadata=md)), expected_kind="result").tensors["y"]
    assert y.shape == (FUZZ_ROWS, D) and bool(torch.isfinite(y).all())
    stats = fuzz_server.call("stats")
    assert stats["rejected"]["INVALID_ARGUMENT"] >= 300 + seen["n"]
    assert stats["saved_entries"] == 1  # only the valid calls saved activations
    rss1 = fuzz_server.rss()
    assert rss1 < rss0 * 1.10, (rss0, rss1)
    channel.close()
    print(f"fuzz: {seen['n']} malformed frames {seen['kinds']} in {elapsed:.1f} s, "
          f"server RSS {rss0 >> 20} -> {rss1 >> 20} MiB")
