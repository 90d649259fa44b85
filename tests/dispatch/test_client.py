"""ExpertClient against a server process that dies or stops answering: a clear error within the deadline."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from moe_runtime.dispatch.client import ExpertCallError, ExpertClient
from moe_runtime.dispatch.codec import decode_frame
from tests.dispatch.helpers import TOKEN, D, call_code, dispatch_frame, make_shards
from tests.dispatch.servers import ServerProcess
from tests.stopped import wait_stopped


@pytest.mark.parametrize("lane", [False, True], ids=["grpc", "tcp"])
def test_killed_server_gives_a_clear_error_within_the_deadline(lane):
    proc = ServerProcess(auth_token=TOKEN, shards=make_shards([(0, 0)]))
    try:
        address = proc.wait_ready()
        with ExpertClient(address, TOKEN, deadline_s=3.0, lane=lane) as c:
            x = torch.randn(4, D)
            decode_frame(c.dispatch(dispatch_frame([0], [4], x, step=7, layer=0)).result())
            proc.kill()
            t0 = time.monotonic()
            err = call_code(lambda: c.dispatch(dispatch_frame([0], [4], x, step=8)).result())
            elapsed = time.monotonic() - t0
        assert elapsed < 3.5
        assert err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert f"expert server {address}: Dispatch (layer 0, step 8) failed with {err.code.name}" in str(err)
    finally:
        proc.stop()


@pytest.mark.parametrize("lane", [False, True], ids=["grpc", "tcp"])
@pytest.mark.parametrize("first_call", [True, False], ids=["first-call", "after-a-call"])
def test_unresponsive_server_hits_the_deadline(lane, first_call):
    proc = ServerProcess(auth_token=TOKEN, shards=make_shards([(0, 0)]))
    try:
        address = proc.wait_ready()
        import os
        import signal

        with ExpertClient(address, TOKEN, deadline_s=1.0, lane=lane) as c:
            if not first_call:  # the lane connection is open and idle when the server stops answering
                decode_frame(c.dispatch(dispatch_frame([0], [4], torch.randn(4, D), step=4), wait=True).result())
            os.kill(proc.pid, signal.SIGSTOP)  # alive, socket open, never answers
            wait_stopped(proc.pid)  # the signal lands a moment later: a lane call is fast enough to beat it
            try:
                t0 = time.monotonic()
                err = call_code(lambda: c.dispatch(dispatch_frame([0], [4], torch.randn(4, D), step=5)).result())
                assert time.monotonic() - t0 < 4.0  # 1 s deadline + slack for a loaded 2-core machine
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED and "(layer 0, step 5)" in str(err)
            # answering again: the next call gets its own reply (on the lane: a new connection, not the late one)
            x = torch.randn(3, D)
            reply = decode_frame(c.dispatch(dispatch_frame([0], [3], x, step=6), wait=True).result())
            assert reply.header.step == 6 and reply.tensors["y"].shape == (3, D)
    finally:
        proc.stop()


def test_expert_call_error_survives_pickling():
    import pickle

    err = ExpertCallError("127.0.0.1:1", "Dispatch", 3, 7, grpc.StatusCode.UNAVAILABLE, "connection refused")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.layer == 3 and back.code is grpc.StatusCode.UNAVAILABLE
