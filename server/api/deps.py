"""Typed dependencies: settings, service, metrics, principal, request id and a multipart body's images, from app
and request state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPBearer

from server.api.metrics import Metrics
from server.api.parts import Parts
from server.idempotency import Idempotency
from server.queue.base import Broker
from server.service import ScoringService
from server.settings import Settings

# Declares the scheme in the OpenAPI document (so /docs can authorize); the key itself is checked by
# the Authenticate middleware, before the body is read.
bearer = HTTPBearer(auto_error=False, description="one of the server's DVREWARD_API_KEYS, when it has any")


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _service(request: Request) -> ScoringService:
    return request.app.state.service


def _broker(request: Request) -> Broker:
    return request.app.state.broker


def _idempotency(request: Request) -> Idempotency:
    return request.app.state.idempotency


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _request_id(request: Request) -> str:
    return request.state.request_id


def _principal(request: Request) -> str:
    return request.state.principal


def _parts(request: Request) -> Parts | None:
    """A multipart body's images (server.api.multipart put them in the request's state); None for a JSON body."""
    parts = request.scope.get("state", {}).get("parts")
    return Parts(parts) if parts is not None else None


def _failure(request: Request) -> str | None:
    return request.app.state.failure


SettingsDep = Annotated[Settings, Depends(_settings)]
ServiceDep = Annotated[ScoringService, Depends(_service)]
BrokerDep = Annotated[Broker, Depends(_broker)]
IdempotencyDep = Annotated[Idempotency, Depends(_idempotency)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
RequestId = Annotated[str, Depends(_request_id)]
Principal = Annotated[str, Depends(_principal)]
PartsDep = Annotated[Parts | None, Depends(_parts)]
Failure = Annotated[str | None, Depends(_failure)]  # why this process can no longer serve, if it cannot
Authorized = Security(bearer)
