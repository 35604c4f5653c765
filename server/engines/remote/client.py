"""A synchronous client of an OpenAI-compatible chat endpoint, for the remote engines.

One pooled httpx client, at most `concurrency` requests in flight, a timeout per request, and
retries with exponential backoff and full jitter on 429, 5xx and connection errors (a
Retry-After header is honoured). A request that still fails is an EngineError for its caller,
never a made-up answer.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from server.engines import defaults
from server.engines.base import EngineError

log = logging.getLogger("dvreward.remote")

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RemoteOptions:
    """How the remote engines talk to their server."""

    api_key: str | None = None
    concurrency: int = defaults.REMOTE_CONCURRENCY
    timeout_s: float = defaults.REMOTE_TIMEOUT_S
    retries: int = defaults.REMOTE_RETRIES
    backoff_s: float = 0.5  # first retry waits up to this; doubled per attempt, capped at max_backoff_s
    max_backoff_s: float = 10.0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise ValueError("need concurrency >= 1, timeout_s > 0, retries >= 0 and backoff_s >= 0")


class RequestError(EngineError):
    """A request failed for good; ``status`` is the last HTTP status (None for a connection error)."""

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class ChatClient:
    """POSTs to `{base_url}/chat/completions` (and other endpoints) with pooling, limits and retries."""

    def __init__(self, base_url: str, model: str, options: RemoteOptions = RemoteOptions(), *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise EngineError(f"remote engine URL must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.options = options
        self._sleep = sleep
        headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        self._http = httpx.Client(
            headers=headers, timeout=httpx.Timeout(options.timeout_s),
            limits=httpx.Limits(max_connections=options.concurrency, max_keepalive_connections=options.concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="dvreward-remote")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """One chat completion (the model is filled in); RequestError once retries are spent."""
        return self.post("/chat/completions", {"model": self.model, **body})

    def chat_each(self, bodies: Sequence[dict[str, Any]]) -> list[dict[str, Any] | RequestError]:
        """Many chat completions, at most `concurrency` at once; each one's response or its error."""
        def one(body: dict[str, Any]) -> dict[str, Any] | RequestError:
            try:
                return self.chat(body)
            except RequestError as exc:
                return exc

        return list(self._pool.map(one, bodies))

    def post(self, path: str, body: dict[str, Any], *, base: str | None = None) -> dict[str, Any]:
        """POST JSON to `base + path` (default base: the /v1 URL), retrying what a retry can fix."""
        url = (base or self.base_url) + path
        last, status, text = "no attempt made", None, ""
        retry_after: str | None = None
        attempt = 0
        for attempt in range(self.options.retries + 1):
            if attempt:
                self._sleep(self._delay(attempt, retry_after))
            retry_after = None
            try:
                resp = self._http.post(url, json=body)
            except httpx.TransportError as exc:  # connection refused or reset, timeouts
                status, text, last = None, "", f"{type(exc).__name__}: {exc}"
                continue
            status, text = resp.status_code, resp.text
            if resp.is_success:
                return _json_object(resp, url)
            last = f"HTTP {status}: {text[:300]}"
            if status not in RETRY_STATUS:
                break
            retry_after = resp.headers.get("retry-after")
        raise RequestError(f"{url} failed after {attempt + 1} attempt(s): {last}", status, text)

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Full jitter: uniform in [0, backoff * 2^(attempt-1)], capped; a server's Retry-After wins if given."""
        if retry_after:
            try:
                return min(max(float(retry_after), 0.0), self.options.max_backoff_s)
            except ValueError:
                log.debug("ignoring a non-numeric Retry-After %r", retry_after)
        cap = min(self.options.backoff_s * 2 ** (attempt - 1), self.options.max_backoff_s)
        return random.uniform(0.0, cap)


def _json_object(resp: httpx.Response, url: str) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError:
        raise RequestError(f"{url} answered {resp.status_code} with a body that is not JSON: {resp.text[:200]!r}",
                           resp.status_code, resp.text) from None
    if not isinstance(data, dict):
        raise RequestError(f"{url} answered {resp.status_code} with JSON that is not an object",
                           resp.status_code, resp.text)
    return data
