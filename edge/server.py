"""The local OpenAI-compatible HTTP endpoint: a starlette app that only translates.

request -> protocol.Request -> the engine's stream (in a worker thread, never on the event loop) -> JSON or
server-sent events. One request generates at a time; up to `max_queue` wait behind it and the rest get 429.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from edge import protocol
from edge.chat import ChatTemplateError
from edge.cors import CORS
from edge.generate import ContextError, ContextLengthError, check_prompt
from edge.metrics import Metrics
from edge.notify import notify, watchdog_interval

DONE = object()


@dataclass
class ServerSettings:
    api_key: str | None = None  # clients must send "Authorization: Bearer KEY"; None leaves the API open
    max_queue: int = 8  # requests that may wait while one generates; more get 429
    max_body: int = 1 << 20  # largest request body in bytes
    model_name: str = "edge"  # the id /v1/models reports
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API ("*" for any); none by default


class Gate:
    """One generation at a time, and a bounded line of requests waiting for it."""

    def __init__(self, max_queue: int, metrics: Metrics):
        self.lock = asyncio.Lock()
        self.max_queue, self.waiting, self.metrics = max_queue, 0, metrics

    async def enter(self) -> None:
        if self.lock.locked() and self.waiting >= self.max_queue:
            raise protocol.APIError(429, f"the server is busy ({self.waiting} requests waiting); retry shortly",
                                    kind="requests", code="rate_limit_exceeded")
        self.waiting += 1
        self.metrics.queue_depth = self.waiting
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1
            self.metrics.queue_depth = self.waiting
        self.metrics.busy = 1

    def leave(self) -> None:
        self.metrics.busy = 0
        self.lock.release()


class Generation:
    """One request's run of the engine in a worker thread, handing records to the event loop as they come.

    Closing it (client gone, shutdown, done) stops the engine at its next token and frees the gate.
    """

    def __init__(self, engine, ids: list[int], params: dict, gate: Gate):
        self.engine, self.ids, self.params, self.gate = engine, ids, params, gate
        self.cancel = threading.Event()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.thread: threading.Thread | None = None
        self.closed = False

    def start(self) -> None:
        self.thread = threading.Thread(target=self._produce, args=(asyncio.get_running_loop(),), daemon=True)
        self.thread.start()

    def _produce(self, loop: asyncio.AbstractEventLoop) -> None:
        def put(item):
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                self.cancel.set()
        try:
            for record in self.engine.stream(self.ids, **self.params):
                put(record)
                if self.cancel.is_set():
                    break
        except Exception as e:  # reported to the client, never fatal to the server
            put(e)
        finally:
            put(DONE)

    async def records(self) -> AsyncIterator:
        while (item := await self.queue.get()) is not DONE:
            if isinstance(item, Exception):
                raise item
            yield item

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.cancel.set()
        with anyio.CancelScope(shield=True):  # even when cancelled, wait for the engine before freeing it
            if self.thread is not None:
                await anyio.to_thread.run_sync(self.thread.join)
            self.gate.leave()


class Tally:
    """Counts one request's tokens and times, for usage and metrics."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens, self.tokens, self.started = prompt_tokens, 0, time.perf_counter()
        self.first: float | None = None
        self.records: list = []

    def add(self, record) -> None:
        self.tokens += 1
        self.records.append(record)
        if self.first is None:
            self.first = time.perf_counter()

    def report(self, metrics: Metrics) -> None:
        ttft = self.first - self.started if self.first else None
        decode = None
        if self.first and self.tokens > 1:
            decode = (self.tokens - 1) / max(time.perf_counter() - self.first, 1e-9)
        metrics.generation(self.prompt_tokens, self.tokens, ttft, decode)

    def usage(self) -> dict:
        return protocol.usage(self.prompt_tokens, self.tokens)


class EdgeState:
    """What the app holds: the engine (once loaded), settings, metrics and the gate."""

    def __init__(self, engine_or_loader, settings: ServerSettings):
        self.settings, self.metrics = settings, Metrics()
        self.gate = Gate(settings.max_queue, self.metrics)
        ready = hasattr(engine_or_loader, "stream")  # an Engine (or a wrapper of one), else a function making one
        self.engine = engine_or_loader if ready else None
        self.loader: Callable | None = None if ready else engine_or_loader
        self.load_error: str | None = None

    def load(self) -> None:
        try:
            self.engine = self.loader()
        except Exception as e:  # reported by /health and every request, the server stays up
            self.load_error = f"{type(e).__name__}: {e}"
            # ready all the same: the server is up and /health says why (a restart would not load it either)
            notify(f"READY=1\nSTATUS=the model did not load: {self.load_error}"[:400])
            return
        notify("READY=1\nSTATUS=serving")  # systemd starts dependent units and counts the start as done


async def pet_watchdog(interval: float) -> None:
    """WATCHDOG=1 from the event loop itself: a loop stuck on blocking work stops the pings."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def make_app(engine_or_loader, settings: ServerSettings | None = None) -> Starlette:
    """The app, for uvicorn, tests or a product's own server; the loader runs in a thread at startup."""
    state = EdgeState(engine_or_loader, settings or ServerSettings())

    @asynccontextmanager
    async def lifespan(app):
        if state.engine is None:
            threading.Thread(target=state.load, daemon=True).start()  # /health says 503 until it is done
        else:
            notify("READY=1\nSTATUS=serving")
        interval = watchdog_interval()
        pets = asyncio.create_task(pet_watchdog(interval)) if interval else None
        yield
        notify("STOPPING=1")
        if pets:
            pets.cancel()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", endpoint(metrics_text, state), methods=["GET"]),
        Route("/v1/models", endpoint(models, state), methods=["GET"]),
        Route("/v1/chat/completions", endpoint(completions("chat"), state), methods=["POST"]),
        Route("/v1/completions", endpoint(completions("completion"), state), methods=["POST"]),
    ]
    middleware = [Middleware(CORS, origins=state.settings.cors_origins)] if state.settings.cors_origins else []
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware,
                    exception_handlers={HTTPException: http_error})
    app.state.edge = state
    return app


async def http_error(request: Request, e: HTTPException) -> Response:
    """Unknown paths and methods answered with OpenAI's error body, as the endpoints answer."""
    message = f"Invalid URL ({request.method} {request.url.path})" if e.status_code == 404 else e.detail
    return JSONResponse(protocol.APIError(e.status_code, message).body(), status_code=e.status_code,
                        headers=e.headers)


def endpoint(handler, state: EdgeState):
    """Key check, errors as OpenAI error bodies, and request counting, around a handler."""
    async def run(request: Request) -> Response:
        try:
            check_key(request, state.settings)
            response = await handler(request, state)
        except protocol.APIError as e:
            headers = {"Retry-After": "1"} if e.status == 429 else None
            response = JSONResponse(e.body(), status_code=e.status, headers=headers)
        except Exception as e:  # a bug must not take the server down
            response = JSONResponse(protocol.APIError(500, f"internal error: {type(e).__name__}: {e}",
                                                      kind="server_error").body(), status_code=500)
        state.metrics.request(request.url.path, response.status_code)
        return response
    return run


def check_key(request: Request, settings: ServerSettings) -> None:
    """`Authorization: Bearer KEY`, the scheme in any case (RFC 7235), the key compared in constant time."""
    if settings.api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
    right_key = hmac.compare_digest(given.strip().encode(), settings.api_key.encode())
    if scheme.lower() != "bearer" or not right_key:
        raise protocol.APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                kind="authentication_error", code="invalid_api_key")


async def health(request: Request) -> Response:
    state: EdgeState = request.app.state.edge
    if state.engine is not None:
        return JSONResponse({"status": "ok"})
    body = {"status": "error", "error": state.load_error} if state.load_error else {"status": "loading"}
    return JSONResponse(body, status_code=503)


async def metrics_text(request: Request, state: EdgeState) -> Response:
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


async def models(request: Request, state: EdgeState) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": state.settings.model_name, "object": "model",
                                                     "created": 0, "owned_by": "edge-llm"}]})


def ready(state: EdgeState):
    if state.engine is None:
        raise protocol.APIError(503, state.load_error or "the model is still loading", kind="server_error")
    return state.engine


async def read_json(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise protocol.APIError(413, f"request body of {declared} bytes is over the {limit}-byte limit")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise protocol.APIError(413, f"request body is over the {limit}-byte limit")
    return protocol.decode_body(bytes(body))


def completions(kind: str):
    parse = protocol.parse_chat if kind == "chat" else protocol.parse_completion

    async def handle(request: Request, state: EdgeState) -> Response:
        engine = ready(state)
        req = parse(await read_json(request, state.settings.max_body))
        ids = await run_in_threadpool(encode, engine, req)
        try:
            engine.params(**req.params)
        except ValueError as e:
            raise protocol.APIError(400, str(e), code="invalid_value") from None
        await state.gate.enter()
        generation = Generation(engine, ids, req.params, state.gate)
        generation.start()
        if req.stream:
            return EventStream(sse(generation, req, engine, state, Tally(len(ids))), generation)
        return await collect(generation, req, engine, state, Tally(len(ids)), request)
    return handle


def encode(engine, req: protocol.Request) -> list[int]:
    """Token ids of the request, checked as generation checks them (in a worker thread: templates and tokenizers)."""
    field = "messages" if req.messages else "prompt"
    try:
        ids = engine.encode(req.prompt, req.messages)
        check_prompt(engine.model, ids)
    except ChatTemplateError as e:
        raise protocol.APIError(400, str(e), "messages", code="invalid_value") from None
    except ContextLengthError as e:
        raise protocol.APIError(400, str(e), field, code="context_length_exceeded") from None
    except ContextError as e:
        raise protocol.APIError(400, str(e), field, code="invalid_value") from None
    return ids


async def collect(generation: Generation, req, engine, state: EdgeState, tally: Tally, request: Request) -> Response:
    watcher = asyncio.create_task(stop_when_gone(request, generation))
    try:
        async for record in generation.records():
            tally.add(record)
    finally:
        watcher.cancel()
        await generation.close()
        tally.report(state.metrics)
    records = tally.records
    logprobs = protocol.token_logprobs(records, engine.tokenizer.decode_one, req.kind) if req.logprobs else None
    finish = records[-1].finish_reason if records else "length"
    return JSONResponse(protocol.response(req.kind, protocol.new_id(req.kind), state.settings.model_name,
                                          "".join(r.text for r in records), finish, logprobs, tally.usage()))


async def stop_when_gone(request: Request, generation: Generation) -> None:
    """A non-streaming client that hangs up stops its generation too."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            generation.cancel.set()
            return


async def sse(generation: Generation, req, engine, state: EdgeState, tally: Tally) -> AsyncIterator[str]:
    rid, model, kind = protocol.new_id(req.kind), state.settings.model_name, req.kind
    decode = engine.tokenizer.decode_one
    try:
        if kind == "chat":
            yield event(protocol.chunk(kind, rid, model, None, None, role=True))
        finish = "length"
        async for record in generation.records():
            tally.add(record)
            logprobs = protocol.token_logprobs([record], decode, kind) if req.logprobs else None
            if record.text or logprobs:
                yield event(protocol.chunk(kind, rid, model, record.text, None, logprobs))
            finish = record.finish_reason or finish
        yield event(protocol.chunk(kind, rid, model, None, finish))
        if req.include_usage:
            yield event(protocol.usage_chunk(kind, rid, model, tally.usage()))
        yield "data: [DONE]\n\n"
    except Exception as e:  # headers are sent: report in the stream, then end it
        yield event(protocol.APIError(500, f"generation failed: {e}", kind="server_error").body())
    finally:
        await generation.close()
        tally.report(state.metrics)


def event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events that always free the engine, even if the client left before the first byte."""

    def __init__(self, content, generation: Generation):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.generation.close()


class Server(uvicorn.Server):
    """uvicorn, except that a SIGTERM or Ctrl-C that shut it down gracefully ends the process with status 0:
    uvicorn re-raises the signal afterwards, and a service manager would read that as a failure."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
