"""One error taxonomy for the whole service, mapped to HTTP status codes in one place."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

# "<_io.BytesIO object at 0x7f...>" in a library's message says nothing to a user and leaks a heap address.
_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def scrub(message: str) -> str:
    """A message fit for a client: object reprs with addresses become their type name."""
    return _OBJECT_REPR.sub(lambda m: f"<{m.group(1)}>", message)


def validation_problems(exc: ValidationError) -> list[str]:
    """pydantic's errors as one `field.path: message` line each, without its "Value error, " prefix."""
    out = []
    for err in exc.errors():
        loc, msg = ".".join(str(x) for x in err["loc"]), err["msg"].removeprefix("Value error, ")
        out.append(f"{loc}: {msg}" if loc else msg)
    return out


class ErrorCode(StrEnum):
    bad_request = "bad_request"
    bad_image = "bad_image"
    too_large = "too_large"
    unsupported_media_type = "unsupported_media_type"
    body_timeout = "body_timeout"
    unauthorized = "unauthorized"
    not_found = "not_found"
    rate_limited = "rate_limited"
    unavailable = "unavailable"
    timeout = "timeout"
    decomposition_failed = "decomposition_failed"
    verification_failed = "verification_failed"
    delivery_limit = "delivery_limit"
    expired = "expired"
    aggregation_failed = "aggregation_failed"
    internal = "internal"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.bad_request: 422,
    ErrorCode.bad_image: 422,
    ErrorCode.too_large: 413,
    ErrorCode.unsupported_media_type: 415,
    ErrorCode.body_timeout: 408,
    ErrorCode.unauthorized: 401,
    ErrorCode.not_found: 404,
    ErrorCode.rate_limited: 429,
    ErrorCode.unavailable: 503,
    ErrorCode.timeout: 504,
    ErrorCode.decomposition_failed: 502,
    ErrorCode.verification_failed: 502,
    ErrorCode.delivery_limit: 502,
    ErrorCode.expired: 504,
    ErrorCode.aggregation_failed: 500,
    ErrorCode.internal: 500,
}


class ServiceError(Exception):
    """An error with a code the API maps to a status and a message the user can act on."""

    def __init__(self, code: ErrorCode, message: str, retry_after: float | None = None) -> None:
        message = scrub(message)
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.code]
