"""fan_out: send one frame to each of several expert servers concurrently and collect the replies in order.

The calls run as grpc.aio calls gathered on one event loop shared by the process (a daemon thread, reached with
one `run_coroutine_threadsafe` per fan-out): one hand-off from the caller's thread instead of one per call, and
one thread polling every call (with gRPC futures each channel's polling thread has to wake the caller: more
thread switches on few busy cores; measured in docs/measurements.md). A lone request is made blocking on the
caller's thread instead (cheapest for one call). Clients on a TCP lane (dispatch/lane.py) send on the caller's
thread instead, one `sendmsg` per call, and each reply is read from its socket when it is asked for: no loop and no
hand-off (replies wait in the kernel's buffers meanwhile). `CallPipeline` sends each call as soon as the caller has its frame
and hands back each reply on its own (RemoteDispatcher.dispatch_combine: encode, send and combine overlap).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent import futures
from typing import NamedTuple

import grpc

from moe_runtime.dispatch.client import ExpertCallError, ExpertClient, ExpertFuture

__all__ = ["CallPipeline", "ExpertCall", "PendingFanOut", "fan_out", "fan_out_async"]


class ExpertCall(NamedTuple):
    """One request of a fan-out: a codec frame for `method` ("Dispatch" | "Backward"); layer/step name it in errors;
    `wrapped`: the frame already is a `Frame` message (encoded with the envelope in front, one copy)."""

    client: ExpertClient
    method: str
    frame: bytes | list  # a list: the wrapped frame's parts, for a client on a TCP lane (codec.encode_frame_parts)
    layer: int | None
    step: int | None
    wrapped: bool = False


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


async def _gather(calls: list[tuple[ExpertClient, str, bytes | list[bytes]]]) -> list[bytes | BaseException]:
    return await asyncio.gather(*(client.call_async(method, message) for client, method, message in calls),
                                return_exceptions=True)  # fmt: skip


class PendingFanOut:
    """A fan-out in flight (`fan_out_async`): `result()` waits and returns each reply's codec frame, in order."""

    __slots__ = ("_deadline", "_future", "_lane", "_requests", "_single")

    def __init__(self, requests: Sequence[ExpertCall], future: futures.Future | None,
                 single: ExpertFuture | None, deadline: float,
                 lane: list[ExpertFuture] | None = None):  # fmt: skip
        self._requests, self._future, self._single, self._deadline = requests, future, single, deadline
        self._lane = lane

    def result(self) -> list[memoryview]:
        """Raises ExpertCallError for the first failed request, in request order, once all have finished."""
        if self._single is not None:
            return [self._single.result()]
        if self._lane is not None:
            return _lane_results(self._lane)
        if self._future is None:
            return []
        try:
            outcomes = self._future.result(self._deadline)
        except futures.TimeoutError:  # only if the loop itself is stuck: every call has its own deadline
            self._future.cancel()
            client, method, _, layer, step, _ = self._requests[0]
            raise ExpertCallError(client.address, method, layer, step, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"fan-out to {[c.address for c, *_ in self._requests]} did not finish in "
                                  f"{self._deadline} s") from None  # fmt: skip
        return [ExpertFuture(None, client, method, layer, step, outcome).result()
                for (client, method, _, layer, step, _), outcome in zip(self._requests, outcomes)]  # fmt: skip


class CallPipeline:
    """Calls sent one at a time (`send`, on the shared loop, as soon as each frame is encoded: the first server
    works while the caller encodes the next) and waited for one at a time (`reply(i)`: the caller uses each reply
    as it arrives, while the later ones are still in flight). Errors as fan_out's: `reply` raises ExpertCallError."""

    __slots__ = ("_futures", "_requests")

    def __init__(self) -> None:
        self._requests: list[ExpertCall] = []
        self._futures: list[futures.Future | ExpertFuture] = []  # ExpertFuture: a lane call

    def __len__(self) -> int:
        return len(self._requests)

    def send(self, request: ExpertCall) -> None:
        client, method, frame, layer, step, wrapped = request
        if client.uses_lane():  # sent on this thread; the reply is read by `reply`
            self._futures.append(client.call(method, frame, layer=layer, step=step, wrapped=wrapped))
            self._requests.append(request)
            return
        message = client.wire_message(frame, wrapped)  # built here: the loop's thread only does I/O
        self._futures.append(asyncio.run_coroutine_threadsafe(client.call_async(method, message), _SharedLoop.get()))
        self._requests.append(request)

    def reply(self, i: int) -> memoryview:
        """Request i's reply frame (a view), waiting for it; raises ExpertCallError."""
        client, method, _, layer, step, _ = self._requests[i]
        future = self._futures[i]
        if isinstance(future, ExpertFuture):
            return future.result()
        try:
            outcome = future.result(client.deadline_s + 5.0)  # the call has its own deadline: only a stuck loop
        except futures.TimeoutError:
            future.cancel()
            raise ExpertCallError(client.address, method, layer, step, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"call did not finish in {client.deadline_s + 5.0} s") from None  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - the call's error, turned into ExpertCallError below
            outcome = e
        return ExpertFuture(None, client, method, layer, step, outcome).result()

    def wait_all(self) -> None:
        """Wait until every call has finished (before raising for one: none is left running unseen)."""
        _lane_results([f for f in self._futures if isinstance(f, ExpertFuture)], raise_first=False)
        futures.wait([f for f in self._futures if not isinstance(f, ExpertFuture)],
                     timeout=max((r.client.deadline_s for r in self._requests), default=0.0) + 5.0)  # fmt: skip

    def replies(self) -> list[memoryview]:
        """Every reply, in order, once all have finished; raises ExpertCallError for the first failed one."""
        self.wait_all()
        return [self.reply(i) for i in range(len(self._requests))]


def fan_out_async(requests: Sequence[ExpertCall]) -> PendingFanOut:
    """Send the requests concurrently and return at once; the calls proceed on gRPC's and the shared loop's
    threads while the caller computes (two-batch overlap). A lone request is a gRPC future (no loop hand-off)."""
    requests = [r if isinstance(r, ExpertCall) else ExpertCall(*r) for r in requests]  # plain 5-tuples too
    if not requests:
        return PendingFanOut(requests, None, None, 0.0)
    if all(r.client.uses_lane() for r in requests):  # each sent on this thread, read when asked for
        return PendingFanOut(requests, None, None, 0.0, lane=[
            r.client.call(r.method, r.frame, layer=r.layer, step=r.step, wrapped=r.wrapped) for r in requests])
    if len(requests) == 1 and not requests[0].client.streams(requests[0].frame, requests[0].wrapped):
        client, method, frame, layer, step, wrapped = requests[0]
        return PendingFanOut(requests, None, client.call(method, frame, layer=layer, step=step, wrapped=wrapped),
                             0.0)  # fmt: skip
    calls = [(client, method, client.wire_message(frame, wrapped)) for client, method, frame, _, _, wrapped in requests]
    deadline = max((c.deadline_s for c, _, _ in calls), default=0.0) + 5.0
    return PendingFanOut(requests, asyncio.run_coroutine_threadsafe(_gather(calls), _SharedLoop.get()), None,
                         deadline)


def _lane_results(calls: list[ExpertFuture], raise_first: bool = True) -> list[memoryview]:
    """Every lane call's reply, in order, each read once all before it are; the first failure is raised once every
    call has been read (none left unread on its connection)."""
    replies: list[memoryview] = []
    first: ExpertCallError | None = None
    for call in calls:
        try:
            replies.append(call.result())
        except ExpertCallError as e:
            first = first or e
    if first is not None and raise_first:
        raise first
    return replies


def fan_out(requests: Sequence[ExpertCall]) -> list[memoryview]:
    """Send the requests concurrently and return each reply's codec frame (a view), in order. Every call has its
    client's deadline. Raises ExpertCallError for the first failed request, in request order, once all have
    finished. A lone request is made blocking on the caller's thread."""
    if len(requests) == 1:
        client, method, frame, layer, step, wrapped = ExpertCall(*requests[0])
        return [client.call(method, frame, layer=layer, step=step, wait=True, wrapped=wrapped).result()]
    return fan_out_async(requests).result()
