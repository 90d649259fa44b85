"""Chunked frames (dispatch/chunks.py): a frame as a stream of small Frame messages and its reassembly; through a
server process, chunked Dispatch/Backward give exactly the unary replies (blocking, future and fan-out paths);
malformed streams are INVALID_ARGUMENT naming the problem, and the server goes on serving."""

from __future__ import annotations

import grpc
import pytest
import torch

from moe_runtime.dispatch.chunks import ChunkError, FrameAssembler, chunk_messages
from moe_runtime.dispatch.client import ExpertClient
from moe_runtime.dispatch.codec import decode_frame
from moe_runtime.dispatch.envelope import unwrap_frame, wrap_frame
from moe_runtime.dispatch.fanout import ExpertCall, fan_out, fan_out_async
from moe_runtime.dispatch.service import METHOD_DISPATCH_STREAM, TOKEN_METADATA_KEY
from tests.dispatch.helpers import TOKEN, D, dispatch_frame, make_shards
from tests.dispatch.servers import ServerProcess

CHUNK = 4096


def _frame(rows=300, seed=0, **kw):
    x = torch.randn(rows, D, generator=torch.Generator().manual_seed(seed))
    return dispatch_frame([0, 1], [rows // 3, rows - rows // 3], x, **kw), x


@pytest.mark.parametrize("chunk", [4096, 5000, 1 << 20])
def test_chunks_reassemble_to_the_frame(chunk):
    frame, _ = _frame()
    messages = list(chunk_messages(frame, chunk))
    assert len(messages) == -(-len(frame) // chunk) or len(messages) == 1
    assert all(len(unwrap_frame(m)) <= max(chunk, 200) for m in messages)
    asm = FrameAssembler(1 << 20)
    for m in messages:
        asm.add(m)
    assert bytes(unwrap_frame(asm.message())) == frame
    assert asm.message() == memoryview(wrap_frame(frame))  # what a unary call would have received


def test_first_chunk_holds_the_whole_header():
    frame = dispatch_frame(list(range(300)), [1] * 300, torch.randn(300, D))  # a ~1.5 KB header
    first = unwrap_frame(next(iter(chunk_messages(frame, 4096))))
    assert len(first) >= 4096
    header_heavy = dispatch_frame(list(range(1000)), [0] * 1000, torch.randn(0, D))
    assert bytes(unwrap_frame(next(iter(chunk_messages(header_heavy, 4096))))) == header_heavy


def test_bad_streams_name_the_problem():
    frame, _ = _frame()
    messages = list(chunk_messages(frame, CHUNK))
    with pytest.raises(ChunkError, match="before its first chunk"):
        FrameAssembler(1 << 20).message()
    asm = FrameAssembler(1 << 20)
    asm.add(messages[0])
    with pytest.raises(ChunkError, match=rf"after {CHUNK} of the frame's {len(frame)} bytes"):
        asm.message()
    with pytest.raises(ChunkError, match=f"declares {len(frame)} bytes: exceeds the limit of 5000"):
        FrameAssembler(5000).add(messages[0])
    asm = FrameAssembler(1 << 20)
    for m in messages:
        asm.add(m)
    with pytest.raises(ChunkError, match="brings the frame to"):
        asm.add(messages[1])
    with pytest.raises(ChunkError, match="chunk 0: frame magic"):
        FrameAssembler(1 << 20).add(wrap_frame(b"NOPE" + bytes(100)))
    with pytest.raises(ChunkError, match="not a serialized Frame"):
        FrameAssembler(1 << 20).add(b"\x0a\xff")
    with pytest.raises(ValueError, match="chunk_bytes = 0"):
        next(iter(chunk_messages(frame, 0)))


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(auth_token=TOKEN, shards=make_shards([(0, 0), (0, 1)]))
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_chunked_calls_equal_unary(server):
    frame, _ = _frame(step=3, mb=1)
    with ExpertClient(server, TOKEN) as unary, ExpertClient(server, TOKEN, chunk_bytes=CHUNK) as chunked:
        assert chunked.streams(frame) and not unary.streams(frame)
        ref = decode_frame(unary.dispatch(frame).result(), out_dtype=None).tensors["y"]
        for wait in (True, False):
            got = decode_frame(chunked.dispatch(frame, wait=wait).result(), out_dtype=None).tensors["y"]
            assert torch.equal(got, ref)
        # fan-out (grpc.aio on the shared loop) with a streamed and a unary request, and the async fan-out
        replies = fan_out([ExpertCall(chunked, "Dispatch", frame, 0, 3), ExpertCall(unary, "Dispatch", frame, 0, 3)])
        assert all(torch.equal(decode_frame(r, out_dtype=None).tensors["y"], ref) for r in replies)
        (one,) = fan_out_async([ExpertCall(chunked, "Dispatch", frame, 0, 3)]).result()
        assert torch.equal(decode_frame(one, out_dtype=None).tensors["y"], ref)
        # backward over the stream too (the forward above saved activations under (3, 1, 0, src 0))
        dy = torch.randn(300, D)
        bframe = dispatch_frame([0, 1], [100, 200], dy, kind="backward", name="dy", step=3, mb=1)
        dx = decode_frame(chunked.backward(bframe).result(), out_dtype=None).tensors["dx"]
        assert dx.shape == (300, D) and torch.isfinite(dx).all()
        chunked.end_step(3)


def test_malformed_stream_is_invalid_argument_and_the_server_goes_on(server):
    channel = grpc.insecure_channel(server)
    stream = channel.stream_stream(METHOD_DISPATCH_STREAM, request_serializer=None, response_deserializer=None)
    md = ((TOKEN_METADATA_KEY, TOKEN),)
    frame, _ = _frame()
    cases = {
        "the stream ended after": list(chunk_messages(frame, CHUNK))[:2],
        "chunk 0: frame magic": [wrap_frame(b"JUNK" + bytes(64))],
        "the stream ended before its first chunk": [],
    }
    for expected, messages in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            list(stream(iter(messages), timeout=10, metadata=md))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(stream(iter(list(chunk_messages(frame, CHUNK))), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()
    with ExpertClient(server, TOKEN, chunk_bytes=CHUNK) as c:  # still serving
        assert decode_frame(c.dispatch(frame).result(), out_dtype=None).header.kind == "result"
