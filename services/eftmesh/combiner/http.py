"""The OpenAI-compatible HTTP API of the combiner (`--http-port`): a thin adapter.

    POST /v1/chat/completions   messages, rendered with the role's chat template (as gRPC's)
    POST /v1/completions        a prompt
    GET  /v1/models             `default`, the --composition names, each role alone
    GET  /health/live           200 while the process serves HTTP
    GET  /health/ready          200 once every role has a live replica, 503 before and while draining
    GET  /version               eftmesh's version (as vLLM's server answers it)

A body is validated (`openai_schema`), turned into the gRPC `GenerateRequest` and handed to
`GeneratorServicer.run`: the same validation, admission control (one limit for both APIs),
chat rendering, scheduler, spans and GenAI metrics as a gRPC call. The generation runs on a
thread of its own (the scheduler's API is blocking) and its chunks cross to the event loop
through a queue. A streamed response starts once the first chunk (or the error) is known, so
every refusal, a queue timeout included, is an HTTP status, not an error inside a 200 stream.
A client that disconnects cancels its generation: the scheduler drops it and releases its
sessions (KV blocks) in every role.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib.metadata
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
import uvicorn
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from eftmesh.combiner import compositions, openai_schema as oai
from eftmesh.combiner.stream import Chunk
from eftmesh.combiner.server import HttpConfig
from eftmesh.combiner.servicer import GeneratorServicer
from eftmesh.common import auth
from eftmesh.common.errors import EftMeshError, quote

log = logging.getLogger(__name__)

try:
    _VERSION = importlib.metadata.version("eftmesh")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not installed
    _VERSION = "unknown"

# gRPC status -> (HTTP status, OpenAI error type). docs/api.md has this table.
STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
RETRY_AFTER_S = 1  # what a 429 or 503 tells the client to wait
# An idle client connection is closed after this long (uvicorn's default, 5 s, makes clients that
# pause between requests reconnect often; 75 s is nginx's and Go's keep-alive default).
KEEP_ALIVE_S = 75


def error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
          headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape."""
    if status in (429, 503):
        headers = {"Retry-After": str(RETRY_AFTER_S), **(headers or {})}
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def from_exception(e: BaseException) -> JSONResponse:
    if isinstance(e, EftMeshError) and e.code in STATUS:
        status, type_ = STATUS[e.code]
        code = "model_not_found" if status == 404 else e.code.name.lower()
        return error(status, str(e), type_, getattr(e, "param", None), code)
    log.error("internal error in the HTTP API", exc_info=(type(e), e, e.__traceback__))
    return error(500, f"internal error: {type(e).__name__}", "server_error", code="internal")


def _validation_error(e: ValidationError) -> JSONResponse:
    first = e.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    msg = "unknown field: not part of this API" if first["type"] == "extra_forbidden" else first["msg"]
    return error(400, f"{where}: {msg}{more}", "invalid_request_error", where, "invalid_value")


_PENDING = object()


class _CallContext:
    """`servicer.CallContext` of an HTTP request: no deadline; inactive once the client left."""

    def __init__(self) -> None:
        self.gone = threading.Event()

    def time_remaining(self) -> float | None:
        return None

    def is_active(self) -> bool:
        return not self.gone.is_set()


class _Run:
    """One generation on its own thread; its chunks (then None, or the exception) on a queue."""

    def __init__(self, servicer: GeneratorServicer, msg: Any, route: str, stream: bool = True) -> None:
        self.ctx = _CallContext()
        self.queue: asyncio.Queue[Chunk | BaseException | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        put = self.queue.put_nowait
        attrs = {"http.request.method": "POST", "http.route": route}

        def deliver(item: Chunk | BaseException | None) -> bool:
            try:
                loop.call_soon_threadsafe(put, item)
                return True
            except RuntimeError:  # the event loop is closed (the server stopped): nobody reads on
                self.ctx.gone.set()
                return False

        def produce() -> None:
            chunks = servicer.run(msg, self.ctx, route, attrs, stream)
            try:
                for chunk in chunks:
                    if not deliver(chunk) or not self.ctx.is_active():
                        break
                deliver(None)
            except BaseException as e:  # noqa: BLE001 - handed to the request's task
                deliver(e)
            finally:
                chunks.close()  # a client gone mid-stream: GeneratorExit ends the generation here

        threading.Thread(target=contextvars.copy_context().run, args=(produce,), name="http-gen", daemon=True).start()

    async def next(self) -> Chunk | None:
        """The next chunk; None once the generation finished; raises what it raised."""
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def ready(self) -> Chunk | None | object:
        """`next()` if it would not wait, else _PENDING."""
        try:
            item = self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return _PENDING
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.ctx.gone.set()


class HttpApi:
    """The Starlette application over a `GeneratorServicer`."""

    def __init__(self, servicer: GeneratorServicer, tokenizer: Any, cfg: HttpConfig, tracer: trace.Tracer,
                 ready: Callable[[], bool], tokens: auth.TokenFile | None = None) -> None:
        self.servicer, self.tokenizer, self.cfg, self.tracer = servicer, tokenizer, cfg, tracer
        self.ready, self.tokens = ready, tokens
        self.draining = False
        self._in_flight = 0
        self.created = int(time.time())
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/health/live", self.live, methods=["GET"]),
            Route("/health/ready", self.readiness, methods=["GET"]),
            Route("/health", self.readiness, methods=["GET"]),
            Route("/version", self.version, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_error,
                                                               Exception: self._server_fault})

    async def _server_fault(self, request: Request, e: Exception) -> Response:
        return from_exception(e)  # logged with its traceback; OpenAI's shape, not Starlette's text

    async def _http_error(self, request: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        return error(e.status_code, f"{request.method} {quote(request.url.path)}: {e.detail}", "invalid_request_error",
                     code="not_found" if e.status_code == 404 else None, headers=e.headers)

    # --- health and models -------------------------------------------------------------------

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": _VERSION})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"status": "live"})

    async def readiness(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not self.ready():
            return JSONResponse({"status": "not ready: a role has no live replica"}, status_code=503)
        return JSONResponse({"status": "ready"})

    def _model_json(self, name: str) -> dict[str, Any]:
        d = self.servicer.defaults
        comp = compositions.resolve(name, d.composition, d.compositions, self._roles())
        return {"id": name, "object": "model", "created": self.created, "owned_by": "eftmesh",
                "eft": comp.describe()}

    def _roles(self) -> Mapping[str, object]:
        return self.servicer.decoder.scorer.models

    async def models(self, request: Request) -> Response:
        if (refused := self._refuse_token(request)) is not None:
            return refused
        names = compositions.model_names(self.servicer.defaults.compositions, self._roles())
        return JSONResponse({"object": "list", "data": [self._model_json(n) for n in names]})

    async def model(self, request: Request) -> Response:
        if (refused := self._refuse_token(request)) is not None:
            return refused
        try:
            return JSONResponse(self._model_json(request.path_params["model"]))
        except EftMeshError as e:
            return from_exception(e)

    # --- generations -------------------------------------------------------------------------

    def _refuse_token(self, request: Request) -> Response | None:
        if self.tokens is None:
            return None
        token = auth.bearer([("authorization", request.headers.get("authorization", ""))])
        if token is None:
            return error(401, "this API needs an 'Authorization: Bearer <token>' header", "authentication_error",
                         code="missing_api_key")
        if not self.tokens.accepts(token):
            return error(403, "the bearer token is not accepted", "permission_error", code="invalid_api_key")
        return None

    async def _body(self, request: Request) -> bytes | Response:
        limit = self.cfg.max_request_bytes
        too_large = error(413, f"the request body is over this server's limit of {limit} bytes (--max-request-bytes)",
                          "invalid_request_error", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return too_large
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                return too_large
            parts.append(part)
        return b"".join(parts)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, oai.ChatRequest, "/v1/chat/completions")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, oai.CompletionRequest, "/v1/completions")

    async def _generate(self, request: Request, model: type[oai.ChatRequest] | type[oai.CompletionRequest],
                        route: str) -> Response:
        span = self.tracer.start_span(f"POST {route}", context=propagate.extract(request.headers), kind=SpanKind.SERVER,
                                      attributes={"http.request.method": "POST", "http.route": route,
                                                  "url.path": request.url.path, "url.scheme": request.url.scheme})
        response: Response | None = None
        try:
            with trace.use_span(span, end_on_exit=False):
                response = await self._admit_and_run(request, model, route, span)
            return response
        finally:
            if not isinstance(response, StreamingResponse):  # a stream ends its span when it ends
                _end(span, response.status_code if response is not None else 500)

    async def _admit_and_run(self, request: Request, model: Any, route: str, span: trace.Span) -> Response:
        if (refused := self._refuse_token(request)) is not None:
            return refused
        if self.draining:
            return error(503, "the combiner is draining", "service_unavailable", code="unavailable")
        if self._in_flight >= self.cfg.max_in_flight:
            return error(429, f"over {self.cfg.max_in_flight} HTTP requests in flight", "rate_limit_error",
                         code="resource_exhausted")
        self._in_flight += 1
        try:
            body = await self._body(request)
            if isinstance(body, Response):
                return body
            try:
                parsed = json.loads(body)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                return error(400, f"the body is not JSON (UTF-8): {e}", "invalid_request_error", code="invalid_json")
            if not isinstance(parsed, dict):
                return error(400, "the body must be a JSON object", "invalid_request_error", code="invalid_json")
            try:
                req = model.model_validate(parsed)
                msg = oai.to_pb(req, self.servicer.defaults.compositions, self._roles())
            except ValidationError as e:
                return _validation_error(e)
            except EftMeshError as e:
                return from_exception(e)
            run = _Run(self.servicer, msg, route, bool(req.stream))
            try:
                first = await run.next()
            except asyncio.CancelledError:
                run.cancel()
                raise
            except BaseException as e:  # noqa: BLE001 - every refusal becomes its HTTP status
                run.cancel()
                return from_exception(e)
            out = oai.Output(self.tokenizer, req.model or compositions.DEFAULT_NAME, req, isinstance(req, oai.ChatRequest))
            if req.stream:
                self._in_flight += 1  # held by the stream until it ends

                def closed() -> None:
                    run.cancel()
                    self._in_flight -= 1
                    _end(span, 200 if out.done else 499)  # 499: the client left first (nginx's code)

                return _EventStream(self._stream(run, first, out), closed)
            return await self._whole(run, first, out)
        finally:
            self._in_flight -= 1

    async def _whole(self, run: _Run, first: Chunk | None, out: oai.Output) -> Response:
        chunks, chunk = [], first
        try:
            while chunk is not None:
                chunks.append(chunk)
                chunk = await run.next()
        except asyncio.CancelledError:
            run.cancel()
            raise
        except BaseException as e:  # noqa: BLE001
            return from_exception(e)
        return JSONResponse(out.whole(chunks))

    async def _stream(self, run: _Run, first: Chunk | None, out: oai.Output) -> AsyncIterator[bytes]:
        # The chunks already made go out in one write: under load a stream's chunks queue up
        # while the event loop serves the others, and one write per chunk would cost more.
        events = [out.sse(out.chunk_json(role=True))] if out.chat else []
        chunk = first
        try:
            while chunk is not None:
                events.append(out.sse(out.chunk_json(chunk)))
                if chunk.usage is not None and out.include_usage:
                    events.append(out.sse(out.usage_chunk(chunk)))
                nxt = run.ready()
                if nxt is _PENDING:
                    yield b"".join(events)
                    events = []
                    nxt = await run.next()
                chunk = nxt
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - a failure after the headers: an error event, as vLLM's
            events.append(b"data: " + from_exception(e).body + b"\n\n")
        out.done = True
        events.append(b"data: [DONE]\n\n")
        yield b"".join(events)


class _EventStream(StreamingResponse):
    """Server-sent events whose end, however it comes (done, failed, the client gone before or
    during the stream), cancels the generation if still running and ends the request's span."""

    def __init__(self, events: AsyncIterator[bytes], closed: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.closed = closed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.closed()


def _end(span: trace.Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()


class HttpServer:
    """uvicorn serving an `HttpApi` on a thread of its own, on a socket bound at build time (so
    port 0 reports the port it got)."""

    def __init__(self, api: HttpApi) -> None:
        self.api = api
        cfg = api.cfg
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((cfg.host, cfg.port))
        except OSError as e:
            self.sock.close()
            raise OSError(f"cannot bind {cfg.host}:{cfg.port} (--http-port): {e.strerror or e}") from None
        # Listening from here on: a client that connects before uvicorn's loop runs waits in the
        # backlog instead of being refused.
        self.sock.listen(2048)
        self.port = self.sock.getsockname()[1]
        tls = {"ssl_certfile": cfg.tls.cert, "ssl_keyfile": cfg.tls.key} if cfg.tls is not None else {}
        self.server = uvicorn.Server(uvicorn.Config(
            api.app, lifespan="off", log_level="warning", access_log=False, http="httptools", loop="uvloop",
            timeout_graceful_shutdown=int(cfg.grace_s) or 1, timeout_keep_alive=KEEP_ALIVE_S, **tls))
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="http",
                                        daemon=True)
        self._thread.start()
        log.info("HTTP (OpenAI-compatible) on %s:%d (%s)", self.api.cfg.host, self.port,
                 "TLS" if self.api.cfg.tls is not None else "plaintext")

    def stop(self) -> threading.Event:
        """Refuse new generations (readiness 503), let the running ones finish within the
        grace period, then close; the event is set once closed."""
        self.api.draining = True
        self.server.should_exit = True
        done = threading.Event()
        thread = self._thread

        def wait() -> None:
            if thread is not None:
                thread.join()
            self.sock.close()
            done.set()

        threading.Thread(target=wait, name="http-stop", daemon=True).start()
        return done
