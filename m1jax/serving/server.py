"""`m1jax serve`: a FastAPI app over one continuous-batching `Scheduler`.

Endpoints: `POST /v1/chat/completions` and `/v1/completions` (OpenAI-compatible, SSE streaming),
`POST /v1/minimax-m1/generate` (the seed's API: text, usage, routing logs), `GET /v1/models`, `/health` and
`/metrics` (Prometheus text). Request formats and validation live in `m1jax.serving.openai_protocol`; every bad
request gets a 4xx JSON error naming the field, and nothing a client sends reaches the scheduler unvalidated.

The scheduler runs on its own thread (`Scheduler.start`); handlers wait for results and deltas on worker threads,
so the event loop never blocks. A client that disconnects cancels its request (its slot is freed).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from m1jax.generation import GenerationError
from m1jax.serving.openai_protocol import (
    CHAT_URL,
    COMPLETIONS_URL,
    GENERATE_URL,
    SCHEMAS,
    ApiError,
    ChatStream,
    CompletionStream,
    Defaults,
    build_request,
    chat_completion_body,
    completion_body,
    generate_body,
    new_id,
    parse_body,
    refused,
)

MAX_BODY_BYTES = 64 << 20
_PREFIX = {CHAT_URL: "chatcmpl", COMPLETIONS_URL: "cmpl", GENERATE_URL: "gen"}


def sse(obj: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line (`data: [DONE]` for the string "[DONE]")."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def prometheus_text(stats: dict, http_counts: Counter) -> str:
    """Prometheus exposition text of the scheduler's `stats()` and the server's response counts."""
    lookups, hits = stats.get("prefix_lookups", 0), stats.get("prefix_hits", 0)
    metrics = [
        ("m1jax_queue_length", "gauge", "requests waiting for a slot", stats.get("waiting", 0)),
        ("m1jax_running_slots", "gauge", "slots holding a running request", stats.get("running", 0)),
        ("m1jax_slots", "gauge", "sequence slots of the scheduler", stats.get("slots", 0)),
        ("m1jax_generated_tokens_total", "counter", "tokens generated since start", stats.get("generated_tokens", 0)),
        ("m1jax_tokens_per_second", "gauge", "recent generation throughput", stats.get("tokens_per_s", 0.0)),
        ("m1jax_prefix_cache_lookups_total", "counter", "prefix-cache lookups", lookups),
        ("m1jax_prefix_cache_hits_total", "counter", "prefix-cache hits", hits),
        ("m1jax_prefix_cache_hit_rate", "gauge", "prefix-cache hits / lookups", hits / lookups if lookups else 0.0),
    ]
    if "state_written" in stats:  # m1jax serve --state-dir
        metrics += [
            ("m1jax_state_checkpoints_written_total", "counter", "prefill states written to the state directory",
             stats["state_written"]),
            ("m1jax_state_checkpoints_skipped_total", "counter", "checkpoints not queued (the writer was busy)",
             stats["state_skipped"]),
            ("m1jax_state_restores_total", "counter", "prefills resumed from a state checkpoint",
             stats["state_restores"]),
            ("m1jax_state_prefetched_total", "counter", "restores whose checkpoint was read while the request "
             "waited", stats["state_prefetched"]),
            ("m1jax_state_restored_tokens_total", "counter", "prompt tokens restored from state checkpoints",
             stats["state_restored_tokens"]),
            ("m1jax_state_checkpoints_ignored_total", "counter",
             "checkpoints ignored: unreadable, interrupted or another fingerprint", stats["state_ignored"]),
            ("m1jax_state_disk_bytes", "gauge", "bytes of the state directory's checkpoints", stats["state_bytes"]),
        ]
    lines = []
    for name, kind, help_text, value in metrics:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {float(value):g}"]
    lines += ["# HELP m1jax_http_responses_total HTTP responses by endpoint and status code",
              "# TYPE m1jax_http_responses_total counter"]
    lines += [f'm1jax_http_responses_total{{endpoint="{path}",code="{code}"}} {n}'
              for (path, code), n in sorted(http_counts.items())]
    return "\n".join(lines) + "\n"


def create_app(scheduler, tokenizer, model_name: str, *, context_window: int | None = None,
               defaults: Defaults = Defaults(), max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The server app over a started `scheduler` (the caller runs `scheduler.start()` / `shutdown()`).

    `context_window` (default: the scheduler's) bounds prompt + `max_tokens`; `defaults` fill omitted sampling
    fields; bodies above `max_body_bytes` get 413.
    """
    context_window = int(context_window or scheduler.context_window)
    app = FastAPI(title="m1jax", docs_url=None, redoc_url=None, openapi_url=None)
    http_counts: Counter = Counter()
    counts_lock = threading.Lock()
    limiter: list[anyio.CapacityLimiter] = []

    def waiter() -> anyio.CapacityLimiter:
        """Worker threads that wait on request handles (one per in-flight request; not the default 40)."""
        if not limiter:
            limiter.append(anyio.CapacityLimiter(4096))
        return limiter[0]

    app.add_middleware(_CountResponses, counts=http_counts, lock=counts_lock)

    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(str(err.detail), status=err.status_code, type=kind).body(),
                            status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_request, err: Exception):
        return JSONResponse(ApiError(f"internal error: {type(err).__name__}: {err}", status=500,
                                     type="server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "m1jax",
                                            "max_model_len": context_window}]}

    @app.get("/metrics")
    async def metrics():
        with counts_lock:
            counts = Counter(http_counts)
        return PlainTextResponse(prometheus_text(scheduler.stats(), counts),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def read_body(request: Request, url: str):
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise ApiError(f"Content-Type must be application/json, got {media or 'none'!r}", status=415)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise ApiError(f"the request body is larger than {max_body_bytes} bytes", status=413)
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > max_body_bytes:
                raise ApiError(f"the request body is larger than {max_body_bytes} bytes", status=413)
        body = parse_body(SCHEMAS[url], bytes(raw))
        model = getattr(body, "model", None)
        if model is not None and model != model_name:
            raise ApiError(f"model {model!r} is not served here (this server serves {model_name!r})",
                           param="model", status=404, type="not_found_error")
        return body

    async def wait_result(handle, request: Request):
        """The request's `RequestOutput`; cancels it when the client goes away first."""
        task = asyncio.ensure_future(anyio.to_thread.run_sync(handle.result, limiter=waiter(),
                                                              abandon_on_cancel=True))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    handle.cancel()
        finally:
            if not task.done():
                handle.cancel()
                task.cancel()

    async def serve(request: Request, url: str):
        body = await read_body(request, url)
        response_id, created = new_id(_PREFIX[url]), int(time.time())
        prepared = await anyio.to_thread.run_sync(
            lambda: build_request(body, tokenizer, context_window=context_window, defaults=defaults,
                                  request_id=response_id))
        try:
            handle = scheduler.submit(prepared.request)
        except GenerationError as e:
            raise refused(e, prepared) from None
        if getattr(body, "stream", False):
            cls = ChatStream if url == CHAT_URL else CompletionStream
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = cls(prepared, tokenizer, model=model_name, response_id=response_id, created=created,
                         include_usage=include_usage)
            return StreamingResponse(stream_events(handle, stream, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            output = await wait_result(handle, request)
        except GenerationError as e:  # the scheduler failed the request (not the client's fault)
            raise ApiError(str(e), status=500, type="server_error") from None
        build = {CHAT_URL: chat_completion_body, COMPLETIONS_URL: completion_body, GENERATE_URL: generate_body}[url]
        return JSONResponse(build(output, prepared, tokenizer, model=model_name, response_id=response_id,
                                  created=created))

    async def stream_events(handle, stream, include_usage: bool):
        """SSE events of one request; the request is cancelled if the client leaves before its end."""
        deltas = iter(handle.deltas())
        finished = False
        try:
            for chunk in stream.start():
                yield sse(chunk)
            while not finished:
                delta = await anyio.to_thread.run_sync(next, deltas, None, limiter=waiter(), abandon_on_cancel=True)
                if delta is None:
                    break
                finished = delta.finish_reason is not None
                for chunk in stream.push(delta):
                    yield sse(chunk)
            if include_usage:
                output = await anyio.to_thread.run_sync(handle.result, limiter=waiter(), abandon_on_cancel=True)
                yield sse(stream.usage_chunk(output))
            yield sse("[DONE]")
        except GenerationError as e:  # the scheduler failed the request mid-stream: say so in the stream
            finished = True
            yield sse(ApiError(str(e), status=500, type="server_error").body())
            yield sse("[DONE]")
        finally:
            if not finished:
                handle.cancel()

    @app.post(CHAT_URL)
    async def chat_completions(request: Request):
        return await serve(request, CHAT_URL)

    @app.post(COMPLETIONS_URL)
    async def completions(request: Request):
        return await serve(request, COMPLETIONS_URL)

    @app.post(GENERATE_URL)
    async def generate(request: Request):
        return await serve(request, GENERATE_URL)

    return app


_KNOWN = {CHAT_URL, COMPLETIONS_URL, GENERATE_URL, "/v1/models", "/health", "/metrics"}


class _CountResponses:
    """ASGI middleware counting responses by endpoint and status (a plain ASGI wrapper: Starlette's
    BaseHTTPMiddleware would get between streaming responses and client-disconnect detection)."""

    def __init__(self, app, counts: Counter, lock: threading.Lock):
        self.app, self.counts, self.lock = app, counts, lock

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in _KNOWN else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                with self.lock:
                    self.counts[(path, message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


class BackgroundServer:
    """A uvicorn server for `app` on a thread (tests, notebooks): `start()` returns once it accepts connections."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 60.0) -> str:
        """Starts serving; returns the base URL (`http://host:port`)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
