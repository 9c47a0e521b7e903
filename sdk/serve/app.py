"""The HTTP server's application: OpenAI's chat and text completion endpoints (streamed as
server-sent events or whole), the model list, a health check and the web chat page, over one
loaded `Model` that batches the requests running at once.

Generation runs in worker threads, never on the event loop. A request past the model's slots
plus `max_queue` waiting ones is refused at once (429) rather than queued without bound, and a
client that goes away has its generation stopped and its slot freed."""

from __future__ import annotations

import hmac
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from infopt.api import Model, Prompt
from infopt.decode.generate import Delta, GenerationResult, TextStream
from infopt.errors import ContextLengthError, InfoptError
from infopt.serve.schemas import (
    ApiError,
    BaseRequest,
    ChatRequest,
    CompletionRequest,
    Shapes,
    event,
    parse,
    usage,
    validation_error,
)

# resolved: an editable install links each file, and StaticFiles refuses links leaving its folder
STATIC = Path(__file__).resolve().parent / "static"
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request looks for its client leaving


class Gate:
    """The generation requests in flight (running or waiting for a slot): their count, their
    readers once started, and how many stopped before their end (the client left, or the
    server stopped). Only the event loop's thread touches it, so it needs no lock."""

    def __init__(self, limit: int) -> None:
        self.limit, self.count, self.cancelled = limit, 0, 0
        self.readers: set[Reader] = set()
        self.stopping = False

    def enter(self) -> None:
        if self.stopping:
            raise ApiError(503, "the server is shutting down", type="server_error")
        if self.count >= self.limit:
            raise ApiError(
                429,
                f"the server is busy: all {self.limit} places (running or queued) are taken; "
                "retry shortly",
                type="rate_limit_error",
                code="rate_limit_exceeded",
            )
        self.count += 1

    def leave(self, reader: Reader | None = None) -> None:
        self.count -= 1
        if reader is not None:
            self.readers.discard(reader)
            self.cancelled += reader.result is None

    def stop(self) -> None:
        """Close every request in flight: each ends at its next token, its client told why."""
        self.stopping = True
        for reader in self.readers:
            reader.close()

    def stopped(self) -> ApiError:
        if self.stopping:
            return ApiError(
                503, "the server shut down before the answer's end", type="server_error"
            )
        return ApiError(499, "the client closed the request")


class Reader:
    """A TextStream read in worker threads and closed from the event loop, without waiting. A
    generator cannot be closed while another thread runs it, so a close that finds a read in
    progress leaves the closing to that read, which does it as it returns."""

    def __init__(self, stream: TextStream) -> None:
        self.stream = stream
        self._lock = threading.Lock()  # held while a thread is inside the stream
        self._closing = False

    def read(self) -> Delta | None:
        """The next text or tool calls, or None at the end (or once closed). Blocks: a worker
        thread's."""
        with self._lock:
            delta = None if self._closing else self.stream.next_delta()
        if self._closing:  # a close() that came during the read left it to us
            self.close()
        return delta

    def close(self) -> None:
        """Stop the generation and free its slot now (a request still waiting for a slot
        leaves the queue; a read in progress returns at once), then close the stream: now, or
        as that read returns."""
        self._closing = True
        self.stream.cancel()  # safe from any thread, unlike closing a generator
        if self._lock.acquire(blocking=False):
            try:
                self.stream.close()  # a no-op after the stream's end
            finally:
                self._lock.release()

    @property
    def result(self) -> GenerationResult | None:
        return self.stream.result


class ClosingStream(StreamingResponse):
    """A streaming response that runs `on_close` however it ends: read to the end, cut by the
    client, or cancelled at shutdown, and even if its body was never started."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def create_app(model: Model, *, model_id: str, api_key: str | None, max_queue: int) -> FastAPI:
    """The server's FastAPI application for `model`, known to clients as `model_id`. With
    `api_key`, every /v1 request must carry `Authorization: Bearer <api_key>`."""
    slots = model.status()["slots"]
    gate = Gate(slots + max_queue)
    # Each request in flight has at most one worker thread; the margin serves the threads of
    # requests just closed that are still finishing their last token.
    threads = anyio.CapacityLimiter(gate.limit + 2)

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), api_key):
            raise ApiError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>' with "
                "the key the server was started with",
                code="invalid_api_key",
            )

    app = FastAPI(title="infopt", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _request_invalid)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    v1 = [Depends(authorize)]

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "stopping" if gate.stopping else "ok",
            "model": model_id,
            "pid": os.getpid(),  # which process answered: replicas behind a proxy differ
            **model.status(),
            "in_flight": gate.count,
            "max_in_flight": gate.limit,
            "cancelled": gate.cancelled,
        }

    @app.get("/v1/models", dependencies=v1)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(model_id)]}

    @app.get("/v1/models/{name:path}", dependencies=v1)
    async def model_card(name: str) -> dict[str, Any]:
        _check_model(name, model_id)
        return _model_card(model_id)

    @app.post("/v1/chat/completions", dependencies=v1, response_model=None)
    async def chat(request: Request) -> JSONResponse | StreamingResponse:
        body = parse(ChatRequest, await request.body())
        return await complete(request, body, Shapes(True, model_id))

    @app.post("/v1/completions", dependencies=v1, response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        body = parse(CompletionRequest, await request.body())
        return await complete(request, body, Shapes(False, model_id))

    async def complete(
        request: Request, body: BaseRequest, shapes: Shapes
    ) -> JSONResponse | StreamingResponse:
        if body.model is not None:
            _check_model(body.model, model_id)
        prompt = body.prompt()
        gate.enter()
        try:
            stream, prompt_tokens = await anyio.to_thread.run_sync(
                _open, model, prompt, body, limiter=threads
            )
        except BaseException:
            gate.leave()
            raise
        reader = Reader(stream)
        gate.readers.add(reader)
        if not body.stream:
            try:
                result = await _drain(request, reader, threads)
            finally:
                gate.leave(reader)
            if result is None:
                raise gate.stopped()
            counts = usage(prompt_tokens, result.stats.generated_tokens)
            return JSONResponse(
                shapes.completion(result.text, result.finish_reason, counts, result.tool_calls)
            )

        def close() -> None:
            reader.close()
            gate.leave(reader)

        with_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _events(request, reader, shapes, prompt_tokens, with_usage, gate, threads)
        return ClosingStream(events, close)

    app.state.stop_requests = gate.stop  # for a shutdown past its grace period (the CLI's)
    return app


def _open(model: Model, prompt: Prompt, body: BaseRequest) -> tuple[TextStream, int]:
    """Checks the request against the context and starts its generation (in a worker thread:
    a chat template's rendering and the tokenizer take a while on long prompts)."""
    try:
        settings = body.settings()
        prompt_tokens = len(
            model.encode_prompt(prompt, settings.get("tools"), settings.get("tool_choice"))
        )
        room = model.runtime.max_context - prompt_tokens
        limit = body.token_limit()
        if room < 1 or (limit is not None and limit > room):
            raise ApiError(
                400,
                f"this model's maximum context length is {model.runtime.max_context} tokens; "
                f"the request needs {prompt_tokens + (limit or 1)} ({prompt_tokens} in the "
                f"prompt, {limit or 1} for the completion). Shorten the prompt or max_tokens.",
                param="messages" if isinstance(prompt, list) else "prompt",
                code="context_length_exceeded",
            )
        # No max_tokens: as OpenAI's, the completion may fill the rest of the context.
        stream = model.stream(prompt, max_new_tokens=limit or room, **settings)
    except ContextLengthError as e:
        raise ApiError(400, str(e), code="context_length_exceeded") from e
    except InfoptError as e:
        raise _library_error(e) from e
    return stream, prompt_tokens


async def _drain(
    request: Request, reader: Reader, threads: anyio.CapacityLimiter
) -> GenerationResult | None:
    """The whole generation, read in a worker thread while the client is watched; None if the
    client left first, which closes the stream."""

    def read_all() -> GenerationResult | None:
        while reader.read() is not None:
            pass
        return reader.result

    async def watch() -> None:
        while not await request.is_disconnected():
            await anyio.sleep(DISCONNECT_POLL_S)
        reader.close()

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch)
            # abandon_on_cancel: a shutdown need not wait for the generation, which stops at
            # its next token, closed below
            result = await anyio.to_thread.run_sync(
                read_all, limiter=threads, abandon_on_cancel=True
            )
            tasks.cancel_scope.cancel()
    except InfoptError as e:
        raise _library_error(e) from e
    finally:
        reader.close()
    return result


async def _events(
    request: Request,
    reader: Reader,
    shapes: Shapes,
    prompt_tokens: int,
    with_usage: bool,
    gate: Gate,
    threads: anyio.CapacityLimiter,
) -> AsyncIterator[str]:
    """The stream's server-sent events, each delta read in a worker thread. The response
    closes the reader however it ends (`ClosingStream`)."""
    yield shapes.chunk(None, first=True, with_usage=with_usage)
    calls = 0
    try:
        while not await request.is_disconnected():
            delta = await anyio.to_thread.run_sync(reader.read, limiter=threads)
            if delta is None:
                break
            yield shapes.chunk(
                delta.text,
                with_usage=with_usage,
                tool_calls=delta.tool_calls,
                call_index=calls,
            )
            calls += len(delta.tool_calls)
    except InfoptError as e:  # after the headers went out: the error goes in the stream
        yield event(_library_error(e).body())
        return
    result = reader.result
    if result is None:  # closed: the client left, or the server is stopping
        if gate.stopping:
            yield event(gate.stopped().body())
        return
    yield shapes.chunk(None, result.finish_reason, with_usage=with_usage)
    if with_usage:
        yield shapes.usage_chunk(usage(prompt_tokens, result.stats.generated_tokens))
    yield event("[DONE]")


def _library_error(e: InfoptError) -> ApiError:
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), code="context_length_exceeded")
    if isinstance(e, ValueError):  # InvalidArgumentError and the like: the request's values
        message = str(e)
        fields = ("response_format", "regex", "grammar", "messages", "tool_choice", "tools")
        field = next((f for f in fields if message.startswith(f)), None)
        return ApiError(400, message, param=field)
    return ApiError(500, f"{type(e).__name__}: {e}", type="server_error")


def _check_model(name: str, model_id: str) -> None:
    if name != model_id:
        raise ApiError(
            404,
            f"the model '{name}' does not exist here; this server runs '{model_id}'",
            param="model",
            code="model_not_found",
        )


def _model_card(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "infopt"}


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    if e.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _request_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    # FastAPI answers 422; OpenAI's clients expect 400 and an `error` object
    return await _api_error(request, validation_error(e.errors()))


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return await _api_error(request, ApiError(e.status_code, str(e.detail), type=kind))
