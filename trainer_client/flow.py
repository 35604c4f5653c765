"""The clients' retry core, written once with no I/O: a call is a generator of effects.

A flow yields what it needs done (`Send` a request, `Sleep`, `Encode` images, `Gather` sub-flows
concurrently) and receives the outcome; it decides everything else itself: headers, when to retry and
how long to wait, when to give up, how to parse and merge. `DVRewardClient` and
`AsyncDVRewardClient` only carry out effects (with threads or with asyncio), so both behave the same
by construction, and a test can drive a flow with a script of outcomes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from pydantic import ValidationError

from trainer_client.errors import DVRewardError, ServerError, error_from_response, error_from_transport
from trainer_client.jobs import M

log = logging.getLogger("trainer_client")

T = TypeVar("T")


# What sending a request can raise instead of answering: the driver throws it into the flow, which decides.
SEND_FAILURES = (httpx.TransportError, httpx.InvalidURL)


@dataclass(frozen=True)
class Send:
    """Send one HTTP request; the driver answers with the response or throws the SEND_FAILURES error in."""

    method: str
    path: str
    content: bytes | None = None
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Encode:
    """Encode (image, label) pairs in the encode pool; the driver answers with the encoded files' bytes in order."""

    work: list[tuple[Any, str]]


@dataclass(frozen=True)
class Gather:
    """Run sub-flows concurrently (at most the client's max_concurrency); answered with their results in order.

    A failed sub-flow fails the gather and stops the others.
    """

    flows: list[Flow[Any]]


Effect = Send | Sleep | Encode | Gather
Flow = Generator[Effect, Any, T]


@dataclass
class Backoff:
    """Given an attempt and its error, how long to wait before the next one, or None to give up."""

    max_retries: int = 5
    base: float = 0.5
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, err: DVRewardError) -> float | None:
        """Seconds to wait before retry `attempt` (0-based): full jitter, at least Retry-After."""
        if not err.retryable or attempt >= self.max_retries:
            return None
        delay = self.rng.uniform(0.0, min(self.cap, self.base * 2 ** attempt))
        if err.retry_after is not None:
            delay = max(delay, err.retry_after)
        log.warning("dvreward: %s; retry %d/%d in %.2fs", err, attempt + 1, self.max_retries, delay)
        return delay


def request(send: Send, backoff: Backoff | None) -> Flow[httpx.Response]:
    """One logical request: resent unchanged (same body and Idempotency-Key) until it succeeds or `backoff` gives up.

    The one place that decides retries: an error's class says whether a resend can succeed (see `errors`).
    """
    attempt = 0
    while True:
        try:
            response = yield send
            if response.status_code < 400:
                return response
            err = error_from_response(response)
        except SEND_FAILURES as exc:
            err = error_from_transport(exc)
            err.__cause__ = exc
        delay = backoff.delay(attempt, err) if backoff is not None else None
        if delay is None:
            raise err
        yield Sleep(delay)
        attempt += 1


def parse(model: type[M], response: httpx.Response) -> M:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise ServerError(f"response does not match {model.__name__}: {exc}", code="bad_response",
                          request_id=response.headers.get("X-Request-Id"), status=response.status_code) from exc
