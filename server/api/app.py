"""Application factory: routers, the one ServiceError -> HTTP mapping, body limit and metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dvreward_protocol.schemas import ErrorInfo, ErrorResponse
from server.api.deps import assign_request_id
from server.api.metrics import Metrics
from server.api.routes import score, system
from server.errors import ErrorCode, ServiceError
from server.service import ScoringService
from server.settings import Settings

log = logging.getLogger("dvreward.api")
Background = Callable[[], AbstractAsyncContextManager[None]]


def _error(request: Request, status: int, code: str, message: str, retry_after: float | None = None) -> JSONResponse:
    rid = getattr(request.state, "request_id", None)
    body = ErrorResponse(error=ErrorInfo(code=code, message=message), request_id=rid).model_dump()
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else {}
    if rid:
        headers["X-Request-Id"] = rid
    return JSONResponse(body, status_code=status, headers=headers)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return _error(request, exc.status, exc.code.value, exc.message, exc.retry_after)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for e in exc.errors()[:10]:
        if e.get("type") == "json_invalid":  # loc is ("body", character offset): say so
            where = e.get("loc", ("body", "?"))[-1]
            parts.append(f"body: invalid JSON at character {where} ({(e.get('ctx') or {}).get('error', e.get('msg'))})")
            continue
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return _error(request, 422, ErrorCode.bad_request.value, "; ".join(parts))


async def _http_error(request: Request, exc: Exception) -> Any:
    """Starlette's own errors (unknown route, wrong method, a body json.loads could not even start on:
    not UTF-8, nested too deeply, an integer too long) in the service's error format."""
    assert isinstance(exc, HTTPException)
    cause = exc.__cause__
    if exc.status_code == 404:
        return _error(request, 404, ErrorCode.not_found.value, f"no such endpoint: {request.url.path} (see /docs)")
    if exc.status_code != 400 or cause is None:
        return _error(request, exc.status_code, ErrorCode.bad_request.value, str(exc.detail))
    if isinstance(cause, UnicodeDecodeError):
        reason = f"not UTF-8 text: {cause}"
    elif isinstance(cause, RecursionError):
        reason = "nested too deeply"
    else:
        reason = str(cause) or type(cause).__name__
    return _error(request, 422, ErrorCode.bad_request.value, f"body: invalid JSON ({reason})")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not bad input: logged with its traceback, answered in the service's format with the request id."""
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return _error(request, 500, ErrorCode.internal.value, f"internal error ({type(exc).__name__}); "
                  "the server log has the details under this request id")


class BodyLimit:
    """Refuses bodies over the limit with 413, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send)
        # Without (or with a lying) Content-Length, read the body up to the limit before the app sees it:
        # an error raised while FastAPI reads the body would become its generic 400.
        buffered: list[Message] = []
        seen = 0
        while True:
            msg = await receive()
            buffered.append(msg)
            if msg["type"] != "http.request":
                break
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                return await self._reject(send)
            if not msg.get("more_body", False):
                break
        replay = iter(buffered)

        async def replayed() -> Message:
            msg = next(replay, None)
            return msg if msg is not None else await receive()

        await self.app(scope, replayed, send)

    async def _reject(self, send: Send) -> None:
        body = ErrorResponse(error=ErrorInfo(code=ErrorCode.too_large.value,
                                             message=f"request body exceeds the limit of {self.max_bytes} bytes"))
        payload = body.model_dump_json().encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def create_app(settings: Settings, service: ScoringService, background: Background | None = None) -> FastAPI:
    """`background` runs for the app's lifetime (the embedded worker); the broker closes on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            if background is None:
                yield
            else:
                async with background():
                    yield
        finally:
            await service.broker.close()

    # /docs and /redoc serve their JavaScript and CSS from the package, not a CDN: they work air-gapped.
    app = FastAPIOffline(title="DVReward", version="0.1.0", lifespan=lifespan,
                  description="Decompositional Verifiable Reward: rewards for RL of image generators.")
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = Metrics()
    app.include_router(score.router)
    app.include_router(system.router)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Any]) -> Any:
        t0 = time.perf_counter()
        assign_request_id(request)
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")  # bounded label values
        m: Metrics = app.state.metrics
        m.requests.labels(route, str(response.status_code)).inc()
        m.latency.labels(route).observe(time.perf_counter() - t0)
        return response

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app
