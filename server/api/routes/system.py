"""Liveness, readiness, models and Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dvreward_protocol.schemas import ErrorResponse, ModelsResponse
from server.api.deps import Authorized, BrokerDep, Failure, MetricsDep, SettingsDep
from server.api.edge import accept_post
from server.api.metrics import queue_exposition
from server.errors import ErrorCode, ServiceError

router = APIRouter()
READY_TIMEOUT_S = 1.0  # probes have short timeouts of their own: a frozen queue must be a quick 503
RESTART_S = 5.0  # a supervisor restarts a failed process within seconds


def _alive(failure: str | None) -> None:
    if failure is not None:
        raise ServiceError(ErrorCode.unavailable, failure, retry_after=RESTART_S)


@router.get("/healthz", responses={503: {"model": ErrorResponse}})
async def healthz(failure: Failure) -> dict:
    """The process is alive (says nothing about Redis or other workers); 503 once its embedded worker died."""
    _alive(failure)
    return {"status": "ok"}


RequireWorker = Annotated[bool, Query(description="false: ready once the queue answers, with or without a live "
                                     "worker (where workers scale to zero, the API must queue the work that wakes "
                                     "them)")]


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(broker: BrokerDep, failure: Failure, require_worker: RequireWorker = True) -> dict:
    """Ready when the queue answers (within a second) and, unless require_worker=false, at least one live worker
    has its models loaded; never once the embedded worker died (even if workers elsewhere are live: this process
    must be restarted)."""
    _alive(failure)
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await broker.ping()
            workers = await broker.workers()
    except TimeoutError as exc:
        raise ServiceError(ErrorCode.unavailable, f"the queue did not answer within {READY_TIMEOUT_S:g} s",
                           retry_after=2.0) from exc
    if not workers and require_worker:
        raise ServiceError(ErrorCode.unavailable, "no live worker: start `dvreward worker` (models may be loading)",
                           retry_after=5.0)
    return {"status": "ready", "workers": len(workers)}


ACCEPT_POST_DOC = {"Accept-Post": {"description": "the media types POST /v1/score and /v1/verify take: "
                                  "application/json, multipart/form-data; absent where the multipart form is off "
                                  "(as on servers before it)", "schema": {"type": "string"}}}


@router.get("/v1/models", response_model=ModelsResponse, dependencies=[Authorized],
            responses={200: {"headers": ACCEPT_POST_DOC}, 401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def models(broker: BrokerDep, settings: SettingsDep, response: Response) -> ModelsResponse:
    """Live workers and their models. Accept-Post says which request forms the scoring routes take (clients pick
    multipart, which carries images as bytes, where it is listed)."""
    if settings.multipart_requests:
        response.headers["Accept-Post"] = accept_post(True)
    return ModelsResponse(workers=await broker.workers())


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(m: MetricsDep, broker: BrokerDep) -> Response:
    return Response(generate_latest(m.registry) + await queue_exposition(broker), media_type=CONTENT_TYPE_LATEST)
