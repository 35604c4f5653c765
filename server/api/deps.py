"""Typed dependencies: settings, service, metrics, auth and request ids, from app.state."""

from __future__ import annotations

import hmac
import re
import uuid
from typing import Annotated

from fastapi import Depends, Header, Request

from server.api.metrics import Metrics
from server.errors import ErrorCode, ServiceError
from server.queue.base import Broker
from server.service import ScoringService
from server.settings import Settings

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _service(request: Request) -> ScoringService:
    return request.app.state.service


def _broker(request: Request) -> Broker:
    return request.app.state.service.broker


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def assign_request_id(request: Request) -> str:
    """The client's X-Request-Id when it is a sane label, else a new one; set before anything can fail."""
    given = request.headers.get("x-request-id")
    request.state.request_id = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex
    return request.state.request_id


def _request_id(request: Request) -> str:
    return request.state.request_id


def _authorize(settings: Annotated[Settings, Depends(_settings)],
               authorization: Annotated[str | None, Header()] = None) -> None:
    if not settings.api_keys:
        return
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(key, k) for k in settings.api_keys):
        raise ServiceError(ErrorCode.unauthorized, "missing or invalid API key: send `Authorization: Bearer KEY`")


SettingsDep = Annotated[Settings, Depends(_settings)]
ServiceDep = Annotated[ScoringService, Depends(_service)]
BrokerDep = Annotated[Broker, Depends(_broker)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
RequestId = Annotated[str, Depends(_request_id)]
Authorized = Depends(_authorize)
