"""The gateway's ASGI app (Starlette): OpenAI-compatible routes over one AsyncClient to the coordinator.

Every request becomes one job per prompt on the pool its `model` names. Streams are server-sent events
in OpenAI's chunk format, ending with `data: [DONE]`. Errors are OpenAI error objects whose status comes
from the protocol error code (openai_format.STATUS). A streamed request waits for its first chunk before
answering 200, so that an early error (unknown pool, invalid input, overloaded) keeps its own status.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from orchestrator.client.aio import AsyncClient
from orchestrator.client.sync import RequestError
from protocol import errors as E
from orchestrator.http import openai_format as fmt
from orchestrator.http.openai_format import ApiError
from orchestrator.http.sse import SSEResponse, sse_event

log = logging.getLogger("orchestrator.http")

HEALTH_TIMEOUT = 2.0  # seconds /health waits for the coordinator before answering 503
OPEN_PATHS = ("/health",)  # answered without an API key, for load balancers and Kubernetes probes


class Gateway:
    """Route handlers and their shared state. `spec` is the JSON the coordinator started us with."""

    def __init__(self, spec: dict, api_keys: list | None):
        self.endpoint = spec["endpoint"]
        self.pools: dict = spec["pools"]  # pool name -> handler name
        self.metrics_url = spec.get("metrics_url")
        self.job_timeout = spec.get("job_timeout")
        self.api_keys = [k.encode() for k in api_keys] if api_keys else None
        self.created = int(time.time())
        self.client: AsyncClient | None = None  # made in startup(): it needs the running loop
        self.http: httpx.AsyncClient | None = None

    # ------------------------------------------------------------------ app and lifecycle

    def app(self) -> Starlette:
        routes = [Route("/v1/models", self.models),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                  Route("/health", self.health), Route("/metrics", self.metrics)]
        handlers = {ApiError: _api_error, RequestError: _request_error, 404: _not_found, 405: _not_allowed,
                    500: _internal}
        app = Starlette(routes=routes, lifespan=self.lifespan, exception_handlers=handlers)
        app.add_middleware(_Auth, gateway=self)
        return app

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.client = AsyncClient(self.endpoint, timeout=HEALTH_TIMEOUT)
        self.http = httpx.AsyncClient(timeout=5.0)
        try:
            yield
        finally:
            await self.client.close()
            await self.http.aclose()

    def authorized(self, request_headers) -> bool:
        if self.api_keys is None:
            return True
        scheme, _, token = request_headers.get("authorization", "").partition(" ")
        token = token.strip().encode()
        return scheme.lower() == "bearer" and any(hmac.compare_digest(token, k) for k in self.api_keys)

    # ------------------------------------------------------------------ routes

    async def models(self, request: Request) -> Response:
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "orchestrator",
                 "handler": handler} for name, handler in self.pools.items() if handler in ("generate", "embed")]
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: Request) -> Response:
        return await self._generate(fmt.parse_completion(await _body(request)))

    async def chat(self, request: Request) -> Response:
        return await self._generate(fmt.parse_chat(await _body(request)))

    async def embeddings(self, request: Request) -> Response:
        body = await _body(request)
        model, texts, encoding = fmt.parse_embeddings(body)
        self._check_kind(model, embed=True)
        output = await self._run(model, {"texts": texts})
        return JSONResponse(fmt.embeddings_response(model, output, encoding, body.get("dimensions")))

    async def health(self, request: Request) -> Response:
        try:
            h = await self.client.health()
        except TimeoutError:
            return JSONResponse(fmt.error_body(E.UNAVAILABLE, "the coordinator did not answer"), 503)
        return JSONResponse(h, 200 if h.get("status") == "ready" else 503)

    async def metrics(self, request: Request) -> Response:
        """The coordinator's own Prometheus registry, proxied (one registry, one set of numbers)."""
        if not self.metrics_url:
            raise ApiError(E.UNAVAILABLE, "the coordinator serves no metrics")
        try:
            r = await self.http.get(self.metrics_url)
        except httpx.HTTPError as e:
            raise ApiError(E.UNAVAILABLE, f"the coordinator's metrics endpoint failed: {e}") from None
        return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))

    # ------------------------------------------------------------------ jobs

    def _check_kind(self, model: str, embed: bool) -> None:
        """Refuse a known pool of the wrong kind; an unknown name goes on to the coordinator, whose
        `unknown_pool` becomes a 404."""
        handler = self.pools.get(model)
        if handler is not None and (handler == "embed") != embed:
            raise ApiError(E.BAD_REQUEST, f"model {model!r} is {'not ' if embed else ''}an embeddings model; "
                                          f"use {'/v1/completions' if embed else '/v1/embeddings'}", "model")

    async def _run(self, model: str, inp) -> dict:
        job = await self.client.submit(model, inp, timeout=self.job_timeout)
        return await job.result()

    async def _generate(self, req: fmt.GenRequest) -> Response:
        self._check_kind(req.model, embed=False)
        jobs = [await self.client.submit(req.model, inp, stream=req.stream, timeout=self.job_timeout)
                for inp in req.inputs]
        try:
            if not req.stream:
                outputs = [_generated(req.model, await job.result()) for job in jobs]
                return JSONResponse(fmt.generation_response(req, outputs))
            streams = [job.__aiter__() for job in jobs]
            first = await _first(streams[0])  # before 200: an early error keeps its status
        except BaseException:
            self._cancel(jobs)
            raise
        return SSEResponse(self._events(req, jobs, streams, first), on_disconnect=lambda: self._cancel(jobs))

    def _cancel(self, jobs: list) -> None:
        for job in jobs:
            self.client.cancel_nowait(job)  # no-op for jobs already ended

    async def _events(self, req: fmt.GenRequest, jobs: list, streams: list, first):
        """SSE bodies for each choice in turn (the others' chunks wait in their queues)."""
        outputs = []
        try:
            for i, (job, stream) in enumerate(zip(jobs, streams)):
                if req.chat:
                    yield sse_event(fmt.stream_chunk(req, i, "", first=True))
                pending = [first] if i == 0 and first is not _END else []
                async for chunk in _chain(pending, stream):  # an ended stream yields nothing more
                    if chunk.get("text"):
                        yield sse_event(fmt.stream_chunk(req, i, chunk["text"]))
                out = _generated(req.model, await job.result())
                outputs.append(out)
                yield sse_event(fmt.stream_chunk(req, i, None if req.chat else "", out["finish_reason"]))
            if req.include_usage:
                yield sse_event(fmt.usage_chunk(req, outputs))
        except (RequestError, ApiError) as e:  # after the 200: the error travels as an event, as OpenAI's does
            yield sse_event(fmt.error_body(e.code, e.message))
        yield b"data: [DONE]\n\n"


_END = object()  # a stream that ended before its first chunk


def _generated(model: str, out) -> dict:
    """A generate-schema result, or a 500 naming the pool (a custom handler may answer anything)."""
    if not (isinstance(out, dict) and isinstance(out.get("text"), str) and "finish_reason" in out):
        raise ApiError(E.HANDLER_ERROR, f"pool {model!r} did not answer in the generate handler's output "
                                        f"schema (text, token_ids, finish_reason, usage)")
    return out


async def _first(stream):
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _END


async def _chain(pending: list, stream):
    for item in pending:
        yield item
    async for item in stream:
        yield item


async def _body(request: Request):
    try:
        return json.loads(await request.body())
    except ValueError as e:
        raise ApiError(E.BAD_REQUEST, f"the request body is not valid JSON: {e}") from None


def _error(code: str, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(fmt.error_body(code, message, param), fmt.status_of(code))


async def _api_error(request, exc: ApiError) -> JSONResponse:
    return _error(exc.code, exc.message, exc.param)


async def _request_error(request, exc: RequestError) -> JSONResponse:
    return _error(exc.code, exc.message)


async def _not_found(request, exc) -> JSONResponse:
    return JSONResponse(fmt.error_body("not_found", f"no route {request.url.path}", status=404), 404)


async def _internal(request, exc) -> JSONResponse:
    log.error("%s %s failed: %r", request.method, request.url.path, exc)
    return JSONResponse(fmt.error_body(E.INTERNAL, f"the gateway failed: {type(exc).__name__}"), 500)


async def _not_allowed(request, exc) -> JSONResponse:
    return JSONResponse(fmt.error_body("method_not_allowed", f"{request.method} is not allowed here", status=405),
                        405)


class _Auth:
    """Pure ASGI middleware: every path but OPEN_PATHS needs `Authorization: Bearer KEY` when keys are set."""

    def __init__(self, app, gateway: Gateway):
        self.app, self.gateway = app, gateway

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.gateway.api_keys is not None and scope["path"] not in OPEN_PATHS:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            if not self.gateway.authorized(headers):
                response = _error(fmt.UNAUTHORIZED, "missing or wrong API key: send `Authorization: Bearer KEY`")
                response.headers["www-authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
