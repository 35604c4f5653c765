"""POST /v1/score, /v1/decompose and /v1/verify (score and verify also as multipart/form-data: server.api.multipart)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from dvreward_protocol.schemas import (
    MULTIPART,
    PART_REF,
    REQUEST_PART,
    DecomposeRequest,
    DecomposeResponse,
    ErrorResponse,
    ScoreRequest,
    ScoreResponse,
    VerifyRequest,
    VerifyResponse,
)
from server.api import limits
from server.api.deps import Authorized, MetricsDep, PartsDep, Principal, RequestId, ServiceDep, SettingsDep
from server.api.metrics import Metrics
from server.api.parts import digest

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 408, 413, 415, 422, 429, 500, 502, 503, 504)
}
router = APIRouter(prefix="/v1", dependencies=[Authorized], responses=ERRORS)
IdemKey = Annotated[str | None, Header(alias="Idempotency-Key")]
MULTIPART_PATHS = ("/v1/score", "/v1/verify")  # the routes that take the multipart form too


def _multipart(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI description of a route's multipart form (FastAPI writes the JSON one from the parameter)."""
    schema = {"type": "object", "required": [REQUEST_PART], "properties": {
        REQUEST_PART: {"$ref": f"#/components/schemas/{model.__name__}"}},
        "additionalProperties": {"type": "string", "format": "binary"},
        "description": f"the JSON body as the first part, {REQUEST_PART!r}; each image as a part of its own, which "
                       f"the JSON names `{PART_REF}NAME` where it would hold base64 (every part after the first is "
                       "named by some image)"}
    return {"requestBody": {"content": {MULTIPART: {"schema": schema, "encoding": {
        REQUEST_PART: {"contentType": "application/json"}}}}}}


def _reply(body: dict[str, Any], request_id: str, replayed: bool) -> JSONResponse:
    """The service's body (built and validated as its models) with the request's headers.

    A Response is sent as is: FastAPI does not validate it a second time against `response_model`, which stays
    for the OpenAPI schema.
    """
    headers = {"X-Request-Id": request_id}
    for name, value in body.get("timings", {}).items():
        headers[f"X-{name.replace('_ms', '').title()}-Time-Ms"] = str(value)
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(body, headers=headers)


@router.post("/score", response_model=ScoreResponse, openapi_extra=_multipart(ScoreRequest))
async def score(req: ScoreRequest, request_id: RequestId, service: ServiceDep, settings: SettingsDep,
                metrics: MetricsDep, principal: Principal, parts: PartsDep,
                idempotency_key: IdemKey = None) -> JSONResponse:
    """Rewards, per-question evidence and GRPO advantages for groups of images."""
    images = await asyncio.to_thread(limits.check_score, req, settings, parts)
    body, replayed = await service.once(principal, "score", idempotency_key, req, lambda: digest(req, parts),
                                        lambda: service.score(req, images, request_id))
    for g in body["groups"] if not replayed else ():  # a replay scored nothing: count work once
        for r in g["rewards"]:
            metrics.images.labels("ok" if r is not None else "failed").inc()
        for im in g.get("images") or ():
            _count_sources(metrics, (im.get("p_source") or {}).values())
        if g.get("decomposition_cached") is not None:
            metrics.cache.labels("hit" if g["decomposition_cached"] else "miss").inc()
    for w in body["warnings"] if not replayed else ():
        metrics.warnings.labels(w["code"]).inc()
    return _reply(body, request_id, replayed)


@router.post("/decompose", response_model=DecomposeResponse)
async def decompose(req: DecomposeRequest, request_id: RequestId, service: ServiceDep,
                    settings: SettingsDep) -> JSONResponse:
    """Prompts to atomic yes/no questions (cached by prompt, pipeline, model and template version)."""
    limits.check_prompts(req.prompts, settings)
    body = (await service.decompose(req.prompts, request_id, req.editing)).model_dump(mode="json")
    return _reply(body, request_id, False)


@router.post("/verify", response_model=VerifyResponse, openapi_extra=_multipart(VerifyRequest))
async def verify(req: VerifyRequest, request_id: RequestId, service: ServiceDep, settings: SettingsDep,
                 metrics: MetricsDep, principal: Principal, parts: PartsDep,
                 idempotency_key: IdemKey = None) -> JSONResponse:
    """P(yes) for explicit questions about images; no decomposition."""
    blobs = await asyncio.to_thread(limits.check_verify, req, settings, parts)
    body, replayed = await service.once(principal, "verify", idempotency_key, req, lambda: digest(req, parts),
                                        lambda: service.verify(req, blobs, request_id))
    for r in body["results"] if not replayed else ():
        metrics.images.labels("ok" if r["p"] is not None else "failed").inc()
        _count_sources(metrics, r.get("p_source") or ())
    return _reply(body, request_id, replayed)


def _count_sources(metrics: Metrics, sources: Iterable[str]) -> None:
    """`dvreward_p_source_total`: a rise in top_k or text means p is no longer exact."""
    for source in sources:
        metrics.p_source.labels(source).inc()
