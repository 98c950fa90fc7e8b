"""The local OpenAI-compatible HTTP endpoint: a starlette app that only translates.

request -> protocol.Request -> a job on the engine's worker thread (edge/worker.py: never on the event loop) ->
its records -> JSON or server-sent events. One request generates at a time; up to `max_queue` wait behind it and
the rest get 429.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

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
from edge.constraint import ConstraintError
from edge.cors import CORS
from edge.generate import ContextError, ContextLengthError
from edge.metrics import Metrics
from edge.notify import notify, watchdog_interval
from edge.prefix import PrefixCacheFileError
from edge.worker import DONE, BusyError



@dataclass
class ServerSettings:
    api_key: str | None = None  # clients must send "Authorization: Bearer KEY"; None leaves the API open
    max_queue: int = 8  # requests that may wait while one generates; more get 429
    max_body: int = 1 << 20  # largest request body in bytes
    model_name: str = "edge"  # the id /v1/models reports
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API ("*" for any); none by default
    prefix_cache_file: Path | None = None  # the prefix cache is saved here at shutdown and restored at start


class Generation:
    """One request's job on the engine's worker (edge/worker.py), its records handed to the event loop as they come.

    Closing it (client gone, shutdown, done) stops the job at its next token and waits until the worker is done
    with it.
    """

    def __init__(self, engine, ids: list[int], params, req: protocol.Request, settings: ServerSettings):
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        # A closed loop (shutdown) raises here, which the job takes as its reader gone: it stops.
        put = lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item)  # noqa: E731
        try:  # the worker checks the prompt (it fits, its ids are in the vocabulary) before queuing it
            self.job = engine.submit(ids, params, put, req.cache_prompt, settings.max_queue)
        except BusyError as e:
            raise protocol.APIError(429, str(e), kind="requests", code="rate_limit_exceeded") from None
        except ContextError as e:
            raise refused_prompt(e, req) from None
        self.closed = False

    @property
    def cancel(self):
        return self.job.cancel

    async def records(self) -> AsyncIterator:
        while (item := await self.queue.get()) is not DONE:
            if isinstance(item, Exception):
                raise item
            yield item

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.job.cancel.set()
        with anyio.CancelScope(shield=True):  # even when cancelled, wait for the worker to let go of the job
            await anyio.to_thread.run_sync(self.job.done.wait)


class Tally:
    """Counts one request's tokens and times, for usage and metrics."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens, self.tokens, self.started = prompt_tokens, 0, time.perf_counter()
        self.cached = 0  # prompt tokens the prefix cache served
        self.first: float | None = None
        self.records: list = []

    def add(self, record) -> None:
        self.tokens += 1
        self.records.append(record)
        if self.first is None:
            self.first, self.cached = time.perf_counter(), record.cached_tokens

    def report(self, metrics: Metrics) -> None:
        ttft = self.first - self.started if self.first else None
        decode = None
        if self.first and self.tokens > 1:
            decode = (self.tokens - 1) / max(time.perf_counter() - self.first, 1e-9)
        drafted = sum(r.drafted for r in self.records)
        accepted = sum(r.accepted for r in self.records)
        metrics.generation(self.prompt_tokens, self.tokens, ttft, decode, self.cached, drafted, accepted)

    def usage(self) -> dict:
        return protocol.usage(self.prompt_tokens, self.tokens, self.cached)


class EdgeState:
    """What the app holds: the engine (once loaded), settings and metrics."""

    def __init__(self, engine_or_loader, settings: ServerSettings):
        self.settings, self.metrics = settings, Metrics()
        ready = hasattr(engine_or_loader, "stream")  # an Engine (or a wrapper of one), else a function making one
        self.engine = engine_or_loader if ready else None
        self.loader: Callable | None = None if ready else engine_or_loader
        self.load_error: str | None = None

    def load(self) -> None:
        try:
            engine = self.loader()
            restore_prefix_cache(engine, self.settings.prefix_cache_file)
            self.engine = engine
        except Exception as e:  # reported by /health and every request, the server stays up
            self.load_error = f"{type(e).__name__}: {e}"
            # ready all the same: the server is up and /health says why (a restart would not load it either)
            notify(f"READY=1\nSTATUS=the model did not load: {self.load_error}"[:400])
            return
        notify("READY=1\nSTATUS=serving")  # systemd starts dependent units and counts the start as done


def restore_prefix_cache(engine, path: Path | None) -> None:
    """Warm the prefix cache from the file the last shutdown wrote; a file for another bundle is not used."""
    if path is None or not path.exists():
        return
    try:
        count = engine.load_prefix_cache(path)
        print(f"edge: prefix cache: {count} prompt(s) restored from {path}", file=sys.stderr)
    except PrefixCacheFileError as e:
        print(f"edge: warning: {e}", file=sys.stderr)


def save_prefix_cache(engine, path: Path | None) -> None:
    if path is None or engine is None:
        return
    try:
        count = engine.save_prefix_cache(path)
        print(f"edge: prefix cache: {count} prompt(s) saved to {path}", file=sys.stderr)
    except OSError as e:  # a full or read-only disk costs the warm start, nothing else
        print(f"edge: warning: the prefix cache could not be saved to {path}: {e}", file=sys.stderr)


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
            await anyio.to_thread.run_sync(restore_prefix_cache, state.engine, state.settings.prefix_cache_file)
            notify("READY=1\nSTATUS=serving")
        interval = watchdog_interval()
        pets = asyncio.create_task(pet_watchdog(interval)) if interval else None
        yield
        notify("STOPPING=1")
        if pets:
            pets.cancel()
        await anyio.to_thread.run_sync(save_prefix_cache, state.engine, state.settings.prefix_cache_file)

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
    if state.engine is not None:
        worker, prefix = state.engine.worker, state.engine.prefix_cache
        state.metrics.queue_depth, state.metrics.busy = worker.waiting, worker.busy
        state.metrics.prefix_cache_bytes = prefix.nbytes if prefix else 0
        state.metrics.prefix_cache_entries = len(prefix.entries) if prefix else 0
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
        ids, params = await run_in_threadpool(prepare, engine, req)
        generation = Generation(engine, ids, params, req, state.settings)
        if req.stream:
            return EventStream(sse(generation, req, engine, state, Tally(len(ids))), generation)
        return await collect(generation, req, engine, state, Tally(len(ids)), request)
    return handle


def prepare(engine, req: protocol.Request):
    """Token ids and generation parameters of the request (in a worker thread: templates, tokenizers and
    compiling a constraint take time)."""
    try:
        ids = engine.encode(req.prompt, req.messages)
    except ChatTemplateError as e:
        raise protocol.APIError(400, str(e), "messages", code="invalid_value") from None
    except ContextError as e:
        raise refused_prompt(e, req) from None
    try:
        return ids, engine.params(**req.params)
    except ConstraintError as e:  # llguidance's reason: the schema, grammar or regex cannot be built
        raise protocol.APIError(400, str(e), e.param, code="invalid_value") from None
    except ValueError as e:
        raise protocol.APIError(400, str(e), code="invalid_value") from None


def refused_prompt(e: ContextError, req: protocol.Request) -> protocol.APIError:
    field = "messages" if req.messages else "prompt"
    code = "context_length_exceeded" if isinstance(e, ContextLengthError) else "invalid_value"
    return protocol.APIError(400, str(e), field, code=code)


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
    logprobs = protocol.token_logprobs(records, req.kind) if req.logprobs else None
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
    try:
        if kind == "chat":
            yield event(protocol.chunk(kind, rid, model, None, None, role=True))
        finish = "length"
        async for record in generation.records():
            tally.add(record)
            logprobs = protocol.token_logprobs([record], kind) if req.logprobs else None
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
