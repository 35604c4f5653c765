"""Liveness, readiness, models and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dvreward_protocol.schemas import ModelsResponse
from server.api.deps import Authorized, BrokerDep, MetricsDep
from server.errors import ErrorCode, ServiceError

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict:
    """The process is alive (says nothing about Redis or workers)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(broker: BrokerDep) -> dict:
    """Ready when the queue answers and at least one live worker has its models loaded."""
    await broker.ping()
    workers = await broker.workers()
    if not workers:
        raise ServiceError(ErrorCode.unavailable, "no live worker: start `dvreward worker` (models may be loading)",
                           retry_after=5.0)
    return {"status": "ready", "workers": len(workers)}


@router.get("/v1/models", response_model=ModelsResponse, dependencies=[Authorized])
async def models(broker: BrokerDep) -> ModelsResponse:
    return ModelsResponse(workers=await broker.workers())


@router.get("/metrics")
async def metrics(m: MetricsDep) -> Response:
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
