"""Application factory: routers, the edge middleware and the one ServiceError -> HTTP mapping."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from dvreward_protocol.schemas import MULTIPART
from server.api.admission import Admission
from server.api.edge import Authenticate, BodyGuard, HeadAsGet, Observe, error_response
from server.api.metrics import Metrics
from server.api.multipart import MultipartBody
from server.api.routes import score, system
from server.errors import ErrorCode, ServiceError
from server.idempotency import Idempotency, Keeping
from server.queue.base import Broker
from server.service import ScoringService
from server.settings import Settings
from server.worker import death_reason

Died = Callable[[BaseException], None]
Background = Callable[[Died], AbstractAsyncContextManager[None]]  # given what to call if it ends by itself

log = logging.getLogger("dvreward.api")


def _error(request: Request, status: int, code: str, message: str, retry_after: float | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return error_response(status, code, message, getattr(request.state, "request_id", None), retry_after, headers)


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
    if exc.status_code != 400 or cause is None:  # its headers (Allow of a 405) are part of the answer
        return _error(request, exc.status_code, ErrorCode.bad_request.value, str(exc.detail),
                      headers=dict(exc.headers) if exc.headers else None)
    if isinstance(cause, UnicodeDecodeError):
        reason = f"not UTF-8 text: {cause}"
    elif isinstance(cause, RecursionError):
        reason = "nested too deeply"
    else:
        reason = str(cause) or type(cause).__name__
    return _error(request, 422, ErrorCode.bad_request.value, f"body: invalid JSON ({reason})")


def _json_only(app: FastAPI) -> None:
    """Where the multipart form is off (DVREWARD_MULTIPART_REQUESTS=false), the OpenAPI document does not offer it."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        schema = build()
        for path in score.MULTIPART_PATHS if fresh else ():
            schema["paths"][path]["post"]["requestBody"]["content"].pop(MULTIPART)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings, broker: Broker, service: ScoringService, background: Background | None = None,
               on_background_death: Died | None = None) -> FastAPI:
    """The service's routes over `broker` (probes, metrics and idempotency records use it directly; scoring goes
    through `service`). `background` runs for the app's lifetime (the embedded worker); the broker closes on
    shutdown.

    If the background ends by itself, the process can no longer serve: `app.state.failure` says why (/healthz and
    /readyz answer 503 with it) and `on_background_death` decides what the process does."""

    def died(exc: BaseException) -> None:
        reason = death_reason(exc)
        log.critical("the embedded worker stopped (%s): this process can no longer score", reason)
        app.state.failure = f"the embedded worker stopped ({reason}); the process must be restarted"
        if on_background_death is not None:
            on_background_death(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            if background is None:
                yield
            else:
                async with background(died):
                    yield
        finally:
            await broker.close()

    # /docs and /redoc serve their JavaScript and CSS from the package, not a CDN: they work air-gapped. The assets
    # live under /docs, so that a public /docs (DVREWARD_PUBLIC_ROUTES) loads them without a key.
    app = FastAPIOffline(title="DVReward", version="0.1.0", lifespan=lifespan, static_url="/docs/static",
                  description="Decompositional Verifiable Reward: rewards for RL of image generators.")
    app.state.settings = settings
    app.state.service = service
    app.state.broker = broker
    app.state.idempotency = Idempotency(broker, Keeping(settings.result_ttl_s, settings.idempotency_max_bytes),
                                        settings.request_timeout_s)
    app.state.failure = None
    app.state.metrics = Metrics()
    app.include_router(score.router)
    app.include_router(system.router)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)

    if not settings.multipart_requests:
        _json_only(app)

    # added innermost first: Observe sees every response, Authenticate runs before any body is read
    app.add_middleware(HeadAsGet)
    app.add_middleware(MultipartBody)
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s,
                       admission=Admission(settings.max_inflight_requests, settings.max_inflight_bytes),
                       multipart_paths=score.MULTIPART_PATHS if settings.multipart_requests else ())
    app.add_middleware(Authenticate, api_keys=settings.api_keys, public_routes=settings.public_routes)
    app.add_middleware(Observe, metrics=app.state.metrics)
    return app
