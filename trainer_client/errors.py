"""Typed errors of the trainer client, so a trainer can react per cause (retry later, fix input, skip a step).

Every error carries the service's `code`, `message`, `request_id` and HTTP `status` (None when no response
arrived), and says by its class whether sending the same request again can succeed (`retryable`, marked *
below): the retry core (`flow.request`) retries exactly those, with backoff. Request-level failures raise;
per-image failures follow `on_error`.

    DVRewardError
    ├── ConfigurationError        the request cannot be sent as configured: a base URL without http:// or
    │                             https://, an unsupported protocol, an invalid header (raised at once)
    ├── BadRequest                4xx: the request itself is wrong
    │   ├── Unauthorized          401 / 403: missing or wrong API key
    │   └── PayloadTooLarge       413: too many or too large images, or an item over the token budget
    ├── RateLimited *             429: the queue, or the API's requests in flight, are full (Retry-After)
    ├── Unavailable *             503: no live worker, or the queue is unreachable
    │   └── ConnectionFailed *    no response: connection refused or reset, response lost
    │       └── TransportTimeout * no response within the client's own timeout (connect, read, write, pool)
    ├── DeadlineExceeded          504: the service's request deadline passed (the same work would again)
    ├── ServerError               another 5xx (e.g. 502 decomposition_failed), or a response that does not parse
    └── ScoringError              the request succeeded but its result is unusable as asked
        └── ImageFailed           on_error="raise" and some images failed; `.failures` says why

A resend is safe: every POST carries an Idempotency-Key, so a retry after a lost response is answered from
the first attempt.
"""

from __future__ import annotations

import email.utils
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx


class DVRewardError(Exception):
    """Base of every error the client raises on purpose."""

    retryable = False  # whether the same request, sent again, can succeed

    def __init__(self, message: str, *, code: str = "error", request_id: str | None = None,
                 status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.request_id = request_id
        self.status = status
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "no response"
        rid = f", request_id={self.request_id}" if self.request_id else ""
        return f"{self.code}: {self.message} ({where}{rid})"


class ConfigurationError(DVRewardError):
    """The request cannot be sent as configured (base URL, protocol, headers): fix the client; never retried."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="configuration")

    def __str__(self) -> str:
        return f"{self.code}: {self.message} (not sent)"


class BadRequest(DVRewardError):
    """4xx: the request itself is wrong; retrying the same body cannot help."""


class Unauthorized(BadRequest):
    """401/403: missing or wrong API key."""


class PayloadTooLarge(BadRequest):
    """413: too many / too large images; lower `chunk_images` or `max_request_bytes`."""


class RateLimited(DVRewardError):
    """429: the service queue is full; retried with backoff, honouring Retry-After."""

    retryable = True


class Unavailable(DVRewardError):
    """503: no worker / queue unreachable; retried with backoff."""

    retryable = True


class ConnectionFailed(Unavailable):
    """No response at all (connection refused or reset, response lost); retried, safe thanks to Idempotency-Key."""


class TransportTimeout(ConnectionFailed):
    """No response within the client's own timeout (connect, read, write or pool); retried."""


class DeadlineExceeded(DVRewardError):
    """504: the service's request deadline passed before the work was done; not retried (it would be again)."""


class ServerError(DVRewardError):
    """5xx other than 503/504 (e.g. 502 decomposition_failed): a server-side failure, not retried."""


class ScoringError(DVRewardError):
    """The request succeeded but its result is unusable as asked (e.g. inconsistent chunks, failed images)."""


@dataclass(frozen=True)
class ImageFailure:
    """One image (or verify item) the service could not score, with the service's reason."""

    group: int
    index: int
    code: str
    message: str


class ImageFailed(ScoringError):
    """on_error="raise" and some images failed; `.failures` lists them and `.result` holds everything else."""

    def __init__(self, failures: list[ImageFailure], result: Any, request_id: str | None = None) -> None:
        shown = "; ".join(f"group {f.group} image {f.index}: {f.code}: {f.message}" for f in failures[:5])
        more = f" (+{len(failures) - 5} more)" if len(failures) > 5 else ""
        super().__init__(f"{len(failures)} image(s) failed: {shown}{more}", code="image_failed",
                         request_id=request_id, status=200)
        self.failures = failures
        self.result = result


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds, from either delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _status_class(status: int) -> type[DVRewardError]:
    if status in (401, 403):
        return Unauthorized
    if status == 413:
        return PayloadTooLarge
    if status == 429:
        return RateLimited
    if status == 503:
        return Unavailable
    if status == 504:
        return DeadlineExceeded
    if 400 <= status < 500:
        return BadRequest
    return ServerError


def error_from_response(response: httpx.Response) -> DVRewardError:
    """Map a non-2xx response (JSON error body or not) onto the typed hierarchy."""
    code, message, request_id = f"http_{response.status_code}", response.reason_phrase or "error", None
    try:
        body = json.loads(response.content)
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            code = str(err.get("code") or code)
            message = str(err.get("message") or message)
            request_id = body.get("request_id")
        elif isinstance(body, dict) and "detail" in body:  # plain FastAPI/Starlette errors (404 of an unknown path)
            message = str(body["detail"])
    except (ValueError, UnicodeDecodeError):
        text = response.text.strip()
        if text:
            message = text[:500]
    request_id = request_id or response.headers.get("X-Request-Id")
    cls = _status_class(response.status_code)
    return cls(message, code=code, request_id=request_id, status=response.status_code,
               retry_after=parse_retry_after(response.headers.get("Retry-After")))


# Failures of the client's own making: no resend can succeed.
_UNSENDABLE = (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL)


def error_from_transport(exc: Exception) -> DVRewardError:
    """A request that got no usable response: a client mistake (never retried), a timeout or a lost connection."""
    if isinstance(exc, _UNSENDABLE):
        return ConfigurationError(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, httpx.TimeoutException):
        return TransportTimeout(f"{type(exc).__name__}: {exc}", code="client_timeout")
    return ConnectionFailed(f"{type(exc).__name__}: {exc}", code="transport")


def check_base_url(url: str) -> str:
    """`url` without a trailing slash, if it can be sent to; ConfigurationError at once otherwise (no retry can
    fix it: without a scheme httpx reads `localhost:8000` as the scheme `localhost`)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ConfigurationError(f"base_url {url!r} is not a URL: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        hint = f"; did you mean 'http://{url}'?" if "://" not in url else ""
        raise ConfigurationError(f"base_url {url!r} must be an http:// or https:// URL with a host{hint}")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ConfigurationError(f"base_url {url!r}: port {parsed.port} is not in 1-65535")
    return url.rstrip("/")
