"""POST /v1/score, /v1/decompose and /v1/verify (score and verify also as multipart/form-data: server.api.multipart)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import Response
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
from server.api.deps import (
    Authorized,
    IdempotencyDep,
    MetricsDep,
    PartsDep,
    Principal,
    RequestId,
    ServiceDep,
    SettingsDep,
)
from server.api.metrics import Metrics
from server.api.parts import digest
from server.idempotency import Replay

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


def _reply(content: bytes, timings: dict[str, float], request_id: str, replayed: bool) -> Response:
    """A response body (the service's, serialized from its models, or a replayed one) with the request's headers.

    A Response is sent as is: FastAPI does not validate it a second time against `response_model`, which stays
    for the OpenAPI schema.
    """
    headers = {"X-Request-Id": request_id}
    for name, value in timings.items():
        headers[f"X-{name.replace('_ms', '').title()}-Time-Ms"] = str(value)
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(content, media_type="application/json", headers=headers)


def _answer(resp: ScoreResponse | VerifyResponse | DecomposeResponse | Replay, request_id: str) -> Response:
    if isinstance(resp, Replay):
        return _reply(json.dumps(resp.response).encode(), resp.response["timings"], request_id, True)
    return _reply(resp.model_dump_json().encode(), resp.timings.model_dump(), request_id, False)


@router.post("/score", response_model=ScoreResponse, openapi_extra=_multipart(ScoreRequest))
async def score(req: ScoreRequest, request_id: RequestId, service: ServiceDep, settings: SettingsDep,
                metrics: MetricsDep, principal: Principal, parts: PartsDep, idempotency: IdempotencyDep,
                idempotency_key: IdemKey = None) -> Response:
    """Rewards, per-question evidence and GRPO advantages for groups of images."""
    images = await asyncio.to_thread(limits.check_score, req, settings, parts)
    record = await idempotency.claim(principal, "score", idempotency_key, req,
                                     lambda: digest(req, parts, limits.read_images(req, images)))
    if isinstance(record, Replay):  # a replay scored nothing: it counts no work
        return _answer(record, request_id)
    async with record:
        resp = await service.score(req, images, request_id)
        await record.keep(resp)
    for g in resp.groups:
        for r in g.rewards:
            metrics.images.labels("ok" if r is not None else "failed").inc()
        for im in g.images or ():
            _count_sources(metrics, (im.p_source or {}).values())
        if g.decomposition_cached is not None:
            metrics.cache.labels("hit" if g.decomposition_cached else "miss").inc()
    for w in resp.warnings:
        metrics.warnings.labels(w.code).inc()
    return _answer(resp, request_id)


@router.post("/decompose", response_model=DecomposeResponse)
async def decompose(req: DecomposeRequest, request_id: RequestId, service: ServiceDep,
                    settings: SettingsDep) -> Response:
    """Prompts to atomic yes/no questions (cached by prompt, pipeline, model and template version)."""
    limits.check_prompts(req.prompts, settings)
    return _answer(await service.decompose(req.prompts, request_id, req.editing), request_id)


@router.post("/verify", response_model=VerifyResponse, openapi_extra=_multipart(VerifyRequest))
async def verify(req: VerifyRequest, request_id: RequestId, service: ServiceDep, settings: SettingsDep,
                 metrics: MetricsDep, principal: Principal, parts: PartsDep, idempotency: IdempotencyDep,
                 idempotency_key: IdemKey = None) -> Response:
    """P(yes) for explicit questions about images; no decomposition."""
    blobs = await asyncio.to_thread(limits.check_verify, req, settings, parts)
    record = await idempotency.claim(principal, "verify", idempotency_key, req,
                                     lambda: digest(req, parts, limits.read_images(req, blobs)))
    if isinstance(record, Replay):
        return _answer(record, request_id)
    async with record:
        resp = await service.verify(req, blobs, request_id)
        await record.keep(resp)
    for r in resp.results:
        metrics.images.labels("ok" if r.p is not None else "failed").inc()
        _count_sources(metrics, r.p_source or ())
    return _answer(resp, request_id)


def _count_sources(metrics: Metrics, sources: Iterable[str]) -> None:
    """`dvreward_p_source_total`: a rise in top_k or text means p is no longer exact."""
    for source in sources:
        metrics.p_source.labels(source).inc()
