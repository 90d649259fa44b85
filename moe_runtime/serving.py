"""`moe-runtime serve`: an OpenAI-style `/v1/completions` endpoint over the generation engine.

One engine loop (a thread, `EngineLoop`) owns the Engine and its running batch: between decode steps it admits
the requests that arrived (one prefill for all of them) and drops the aborted ones, so requests from many
clients share one continuous batch. HTTP runs on aiohttp (asyncio, in the main thread): a handler validates the
body (400 naming the field), submits its prompts and reads their token events from an asyncio queue the loop
feeds. `"stream": true` answers with server-sent events (`data: {chunk}` per token, then `data: [DONE]`). A client
that goes away cancels its handler (aiohttp handler_cancellation), which aborts its requests in the loop: their
cache rows are freed before the next step.

Degraded answers (transport.on_expert_failure = mask, runtime/cluster_mask.py): the cluster's backend says after
each prefill / decode step which (layer, expert) pairs that step was computed without (`last_masked`); the loop
keeps, per request, the union over the steps that computed it (its prompt's cache included). Every chunk carries
`degraded` = that union up to its token, a whole response the union over its choices (each choice its own), as
[[layer, expert], ...], [] when none. The same backend starts the cluster's heal when a step found actors down,
so answers return to unmasked ones without a restart (a request that ran during the outage stays degraded).

Why aiohttp and not Ray Serve: the engine must be one loop over one cache (a Serve replica would have to own the
Ray driver of the cluster, plus a controller and proxy actors on this 2-core machine); aiohttp is the server Ray's
own dashboard runs on and comes with ray[default], so serving adds no dependency.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import queue
import signal
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from moe_runtime.generation.engine import BatchState, Engine, Request, TokenEvent
from moe_runtime.generation.sampling import SamplingParams

log = logging.getLogger(__name__)

MAX_PROMPTS_PER_REQUEST = 64


class BadRequest(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# ----------------------------------------------------------------------------------------------- the request body


@dataclass(frozen=True)
class CompletionRequest:
    prompts: tuple[tuple[int, ...] | str, ...]
    params: SamplingParams
    stream: bool
    model: str | None


def _number(body: dict, name: str, default: Any, kind: type, lo: float | None = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or isinstance(value, int))
    if not ok:
        raise BadRequest(name, f"'{name}' = {value!r}: expected {'an integer' if kind is int else 'a number'}")
    if lo is not None and value < lo:
        raise BadRequest(name, f"'{name}' = {value!r}: expected >= {lo}")
    return kind(value)


def _prompts(value: Any) -> list[tuple[int, ...] | str]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, a list of token-id lists."""
    def ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(value, str):
        out: list = [value]
    elif ids(value):
        out = [tuple(value)]
    elif isinstance(value, list) and value and all(isinstance(p, str) or ids(p) for p in value):
        out = [p if isinstance(p, str) else tuple(p) for p in value]
    else:
        raise BadRequest("prompt", f"'prompt' = {json.dumps(value)[:80]}: expected a non-empty string, a list of "
                                   "strings, a list of token ids or a list of token-id lists")
    if any(isinstance(p, str) and not p for p in out):
        raise BadRequest("prompt", "'prompt' has an empty string: expected at least one character")
    if len(out) > MAX_PROMPTS_PER_REQUEST:
        raise BadRequest("prompt", f"'prompt' has {len(out)} prompts: at most {MAX_PROMPTS_PER_REQUEST} per request")
    return out


def parse_completion_request(body: Any) -> CompletionRequest:
    """The body of POST /v1/completions -> CompletionRequest; BadRequest names the field and what was expected."""
    if not isinstance(body, dict):
        raise BadRequest("body", "the request body must be a JSON object")
    if "prompt" not in body:
        raise BadRequest("prompt", "'prompt' is required")
    prompts = _prompts(body["prompt"])
    n = _number(body, "n", 1, int, 1)
    if n != 1:
        raise BadRequest("n", f"'n' = {n}: only n = 1 is supported (send the prompt several times instead)")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise BadRequest("stop", f"'stop' = {stop!r}: expected a string or a list of strings")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream", f"'stream' = {stream!r}: expected true or false")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest("ignore_eos", f"'ignore_eos' = {ignore_eos!r}: expected true or false")
    fields = {
        "max_new_tokens": ("max_tokens", _number(body, "max_tokens", 16, int, 1)),
        "temperature": ("temperature", _number(body, "temperature", 1.0, float, 0)),
        "top_k": ("top_k", _number(body, "top_k", 0, int, 0)),
        "top_p": ("top_p", _number(body, "top_p", 1.0, float)),
        "seed": ("seed", None if body.get("seed") is None else _number(body, "seed", None, int, 0)),
    }
    try:
        params = SamplingParams(stop=stop, ignore_eod=ignore_eos, **{k: v for k, (_, v) in fields.items()})
    except ValueError as e:  # SamplingParams names its own field; map it to the request's
        name = next((api for k, (api, _) in fields.items() if str(e).startswith(k)), "body")
        raise BadRequest(name, str(e).replace("max_new_tokens", "max_tokens")) from None
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model", f"'model' = {model!r}: expected a string")
    return CompletionRequest(tuple(prompts), params, stream, model)


# ----------------------------------------------------------------------------------------------- the engine loop


@dataclass(eq=False)
class _Sink:
    """Where one HTTP request's events go: its event loop and queue."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass(frozen=True)
class Delivered:
    """A token event and the (layer, expert) pairs its request has been computed without so far."""

    event: TokenEvent
    degraded: tuple[tuple[int, int], ...]


@dataclass
class LoopStats:
    admitted: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0
    steps: int = 0
    max_batch: int = 0
    running: int = 0
    tokens: int = 0


@dataclass(eq=False)
class EngineLoop:
    """The one thread that drives the engine. `submit` and `abort` are thread-safe; events go to each request's
    sink, then a final `None` (done) or an Exception (failed)."""

    engine: Engine
    max_batch: int = 64
    stats: LoopStats = field(default_factory=LoopStats)

    def __post_init__(self) -> None:
        self._inbox: queue.Queue = queue.Queue()
        self._aborts: queue.Queue = queue.Queue()
        self._sinks: dict[str, _Sink] = {}
        self._cancelled: set[str] = set()  # aborted before admission
        self._degraded: dict[str, set[tuple[int, int]]] = {}  # request -> pairs masked in the steps that computed it
        self._state = BatchState()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._ids = itertools.count()

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout_s)

    def new_id(self) -> str:
        return f"r{next(self._ids)}"

    def submit(self, requests: Sequence[Request], sink: _Sink) -> None:
        """Validate now (ValueError naming the field), run from the next step on."""
        self.engine.validate(requests)
        for r in requests:
            self._inbox.put((r, sink))

    def abort(self, request_ids: Sequence[str]) -> None:
        self._aborts.put(list(request_ids))

    @property
    def running_ids(self) -> list[str]:
        return self._state.request_ids

    def _run(self) -> None:
        while not self._stop.is_set():
            new = self._take_new(block=not self._state.sequences)
            self._apply_aborts(new)
            try:
                if new:
                    self._admit(new)
                if self._state.sequences:
                    self._deliver(self.engine.step(self._state))
                    self.stats.steps += 1
            except Exception as err:  # noqa: BLE001 - a failed step fails its requests; the loop goes on
                log.exception("engine step failed")
                self._fail_all(err)
            self.stats.running = len(self._state)
            self.stats.max_batch = max(self.stats.max_batch, self.stats.running)

    def _take_new(self, block: bool) -> list[tuple[Request, _Sink]]:
        out = []
        room = self.max_batch - len(self._state)
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while item is not None:
                out.append(item)
                if len(out) >= room:
                    break
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        return out

    def _apply_aborts(self, new: list[tuple[Request, _Sink]]) -> None:
        gone: set[str] = set()
        while True:
            try:
                gone.update(self._aborts.get_nowait())
            except queue.Empty:
                break
        if not gone:
            return
        running = [i for i in self._state.request_ids if i in gone]
        self.engine.abort(self._state, running)
        for rid in running:
            self._sinks.pop(rid, None)
            self._degraded.pop(rid, None)
        self.stats.aborted += len(running)
        self._cancelled |= gone - set(running)  # not admitted yet (or already finished): never admit them

    def _admit(self, new: list[tuple[Request, _Sink]]) -> None:
        cancelled = [r.request_id for r, _ in new if r.request_id in self._cancelled]
        self._cancelled -= set(cancelled)
        self.stats.aborted += len(cancelled)
        new = [(r, s) for r, s in new if r.request_id not in cancelled]
        if not new:
            return
        for r, sink in new:
            self._sinks[r.request_id] = sink
        self.stats.admitted += len(new)
        self._deliver(self.engine.add(self._state, [r for r, _ in new]))

    def _deliver(self, events: list[TokenEvent]) -> None:
        """Events of the step just run (one per request it computed), with the pairs that step was masked on."""
        masked = {(int(la), int(e)) for la, e in getattr(self.engine.backend, "last_masked", ())}
        for e in events:
            self.stats.tokens += 1
            seen = self._degraded.setdefault(e.request_id, set())
            seen |= masked
            sink = self._sinks.get(e.request_id)
            if sink is None:
                self._degraded.pop(e.request_id, None)
                continue
            sink.put(Delivered(e, tuple(sorted(seen))))
            if e.completion is not None:
                del self._sinks[e.request_id]
                self._degraded.pop(e.request_id, None)
                sink.put(None)
                self.stats.finished += 1

    def _fail_all(self, err: Exception) -> None:
        self.engine.abort(self._state, self._state.request_ids)
        for sink in self._sinks.values():
            sink.put(err)
        self.stats.failed += len(self._sinks)
        self._sinks.clear()
        self._degraded.clear()


# ----------------------------------------------------------------------------------------------- HTTP


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param}}, status=status)


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _pairs(pairs: Any) -> list[list[int]]:
    """(layer, expert) pairs as the JSON field `degraded`: [[layer, expert], ...] sorted, [] when none."""
    return [[int(la), int(e)] for la, e in sorted(pairs)]


class CompletionServer:
    """The aiohttp application over an EngineLoop: POST /v1/completions, GET /v1/models, GET /health."""

    def __init__(self, loop: EngineLoop, model_name: str):
        self.engine_loop = loop
        self.model_name = model_name
        self.app = web.Application(client_max_size=4 * 1024 * 1024)
        self.app.add_routes([web.post("/v1/completions", self.completions), web.get("/v1/models", self.models),
                             web.get("/health", self.health)])

    async def health(self, request: web.Request) -> web.Response:
        s = self.engine_loop.stats
        masked = getattr(self.engine_loop.engine.backend, "last_masked", ())  # the last step's (mask mode)
        return web.json_response({"status": "ok", **s.__dict__, "degraded": _pairs(masked)})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                               "owned_by": "moe-runtime"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON", "body")
        try:
            req = parse_completion_request(body)
            if req.model is not None and req.model != self.model_name:
                raise BadRequest("model", f"'model' = {req.model!r}: this server serves {self.model_name!r}")
            tok = self.engine_loop.engine.tokenizer
            ids = [list(p) if not isinstance(p, str) else tok.encode(p) for p in req.prompts]
            requests = [Request(self.engine_loop.new_id(), tuple(p), req.params) for p in ids]
            sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
            self.engine_loop.submit(requests, sink)
        except BadRequest as e:
            return _error(400, str(e), e.param)
        except ValueError as e:  # the engine's checks: prompt length, vocabulary
            return _error(400, str(e), "prompt")
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        index = {r.request_id: i for i, r in enumerate(requests)}
        pending = set(index)
        try:
            if req.stream:
                return await self._stream(request, sink, index, pending, cid, created)
            return await self._collect(sink, requests, index, pending, cid, created)
        finally:
            if pending:  # the client went away (handler cancelled) or the step failed: free the rows
                self.engine_loop.abort(sorted(pending))

    async def _next(self, sink: _Sink, pending: set[str]) -> Delivered | None:
        """The next event; None once every request of this call has finished; raises on a failed step."""
        while pending:
            item = await sink.queue.get()
            if isinstance(item, Exception):
                raise web.HTTPInternalServerError(text=json.dumps({"error": {
                    "message": f"generation failed: {type(item).__name__}: {item}", "type": "server_error",
                    "param": None}}), content_type="application/json")
            if item is None:
                continue
            if item.event.completion is not None:
                pending.discard(item.event.request_id)
            return item
        return None

    async def _collect(self, sink: _Sink, requests: list[Request], index: dict[str, int], pending: set[str],
                       cid: str, created: int) -> web.Response:  # fmt: skip
        done, degraded = {}, {}
        while (d := await self._next(sink, pending)) is not None:
            if d.event.completion is not None:
                done[d.event.request_id] = d.event.completion
                degraded[d.event.request_id] = d.degraded  # the union over the request's steps
        choices = [{"index": index[r.request_id], "text": done[r.request_id].text, "logprobs": None,
                    "finish_reason": done[r.request_id].finish_reason,
                    "token_ids": done[r.request_id].new_token_ids,
                    "degraded": _pairs(degraded[r.request_id])} for r in requests]
        prompt_tokens = sum(len(r.prompt_ids) for r in requests)
        completion_tokens = sum(len(c["token_ids"]) for c in choices)
        return web.json_response({
            "id": cid, "object": "text_completion", "created": created, "model": self.model_name,
            "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt_tokens + completion_tokens},
            "degraded": _pairs({p for c in choices for p in map(tuple, c["degraded"])})})

    async def _stream(self, request: web.Request, sink: _Sink, index: dict[str, int], pending: set[str],
                      cid: str, created: int) -> web.StreamResponse:  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        while True:
            try:
                d = await self._next(sink, pending)
            except web.HTTPException as failed:  # headers are out: the error goes as the last event
                await resp.write(f"data: {failed.text}\n\n".encode())
                break
            if d is None:
                break
            e, degraded = d.event, _pairs(d.degraded)
            chunk = {"id": cid, "object": "text_completion", "created": created, "model": self.model_name,
                     "choices": [{"index": index[e.request_id], "text": e.text_delta, "logprobs": None,
                                  "finish_reason": e.finish_reason, "token_ids": [e.token_id], "degraded": degraded}],
                     "degraded": degraded}
            await resp.write(_sse(chunk))  # a gone client raises here (or cancels the handler)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def start_http(server: CompletionServer, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0: a free port); returns the runner and the bound port."""
    runner = web.AppRunner(server.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


class BackgroundServer:
    """The HTTP server on its own event loop thread (tests, benchmarks): `with BackgroundServer(...) as s:`."""

    def __init__(self, engine: Engine, model_name: str = "moe-runtime", host: str = "127.0.0.1", port: int = 0,
                 max_batch: int = 64):  # fmt: skip
        self.engine_loop = EngineLoop(engine, max_batch).start()
        self.server = CompletionServer(self.engine_loop, model_name)
        self._aio = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._aio.run_forever, name="http", daemon=True)
        self._thread.start()
        self._runner, self.port = asyncio.run_coroutine_threadsafe(start_http(self.server, host, port),
                                                                   self._aio).result(30)
        self.url = f"http://{host}:{self.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._aio).result(30)
        self._aio.call_soon_threadsafe(self._aio.stop)
        self._thread.join(10)
        self.engine_loop.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_forever(engine: Engine, model_name: str, host: str, port: int, on_ready: Any = None) -> None:
    """Run the server in this thread until interrupted (the `serve` command)."""
    engine_loop = EngineLoop(engine).start()
    server = CompletionServer(engine_loop, model_name)

    async def main() -> None:
        runner, bound = await start_http(server, host, port)
        if on_ready is not None:
            on_ready(bound)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    def interrupt(*_: Any) -> None:  # SIGTERM like Ctrl-C: the caller's cleanup (cluster shutdown) runs
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine_loop.close()
