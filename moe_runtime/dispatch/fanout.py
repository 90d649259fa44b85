"""fan_out: send one frame to each of several expert servers concurrently and collect the replies in order.

The calls run as grpc.aio calls gathered on one event loop shared by the process (a daemon thread, reached with
one `run_coroutine_threadsafe` per fan-out): one hand-off from the caller's thread instead of one per call, and
one thread polling every call (with gRPC futures each channel's polling thread has to wake the caller: more
thread switches on few busy cores; measured in docs/measurements.md). A lone request is made blocking on the
caller's thread instead (cheapest for one call).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent import futures
from typing import NamedTuple

import grpc

from moe_runtime.dispatch.client import ExpertCallError, ExpertClient, ExpertFuture
from moe_runtime.dispatch.envelope import wrap_frame

__all__ = ["ExpertCall", "fan_out"]


class ExpertCall(NamedTuple):
    """One request of a fan-out: a codec frame for `method` ("Dispatch" | "Backward"); layer/step name it in errors."""

    client: ExpertClient
    method: str
    frame: bytes
    layer: int | None
    step: int | None


class _SharedLoop:
    """One asyncio loop in a daemon thread for the whole process: grpc.aio fan-out from synchronous callers."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="expert-aio", daemon=True).start()
                cls._loop = loop
            return cls._loop


async def _gather(calls: list[tuple[ExpertClient, str, bytes]]) -> list[bytes | BaseException]:
    return await asyncio.gather(*(client.call_async(method, message) for client, method, message in calls),
                                return_exceptions=True)  # fmt: skip


def fan_out(requests: Sequence[ExpertCall]) -> list[memoryview]:
    """Send the requests concurrently and return each reply's codec frame (a view), in order. Every call has its
    client's deadline. Raises ExpertCallError for the first failed request, in request order, once all have
    finished."""
    if len(requests) == 1:
        client, method, frame, layer, step = requests[0]
        return [client.call(method, frame, layer=layer, step=step, wait=True).result()]
    calls = [(client, method, wrap_frame(frame)) for client, method, frame, _, _ in requests]
    deadline = max((c.deadline_s for c, _, _ in calls), default=0.0) + 5.0
    pending = asyncio.run_coroutine_threadsafe(_gather(calls), _SharedLoop.get())
    try:
        outcomes = pending.result(deadline)
    except futures.TimeoutError:  # only if the loop itself is stuck: every call has its own deadline
        pending.cancel()
        client, method, _, layer, step = requests[0]
        raise ExpertCallError(client.address, method, layer, step, grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"fan-out to {[c.address for c, *_ in requests]} did not finish in {deadline} s"
                              ) from None  # fmt: skip
    return [ExpertFuture(None, client, method, layer, step, outcome).result()
            for (client, method, _, layer, step), outcome in zip(requests, outcomes)]  # fmt: skip
