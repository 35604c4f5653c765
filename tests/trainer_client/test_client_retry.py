"""Retry and backoff details, with httpx.MockTransport (everything else runs against a real service)."""

from __future__ import annotations

import email.utils
import time
import uuid

import httpx
import pytest

from dvreward_protocol.schemas import ScoreResponse
from trainer_client import (
    AsyncDVRewardClient,
    BadRequest,
    ConnectionFailed,
    DeadlineExceeded,
    DVRewardClient,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    TransportTimeout,
    Unauthorized,
    Unavailable,
)
from trainer_client.errors import parse_retry_after

Q = [{"id": "q", "text": "Is there a cube?", "tag": "Existence"}]
OK = ScoreResponse.model_validate({
    "request_id": "rid-ok", "models": {"verifier": "v", "decomposer": None}, "template_version": "t",
    "verifier_system_prompt": "s",
    "aggregation": "geometric", "gating": "none", "timings": {},
    "groups": [{"prompt": "p", "questions": Q, "rewards": [0.5], "errors": [None], "advantages": [0.0]}],
}).model_dump(mode="json")


def _error(status: int, code: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after else {}
    return httpx.Response(status, json={"error": {"code": code, "message": f"{code} happened"},
                                        "request_id": f"rid-{status}"}, headers=headers)


class Script:
    """Answers requests from a list of responses (or exceptions), recording each request."""

    def __init__(self, *steps: httpx.Response | Exception) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, Exception):
            raise step
        return step


def _client(script: Script, **kwargs) -> tuple[DVRewardClient, list[float]]:
    """The script answers the scoring requests alone: the client sends JSON without asking the server first."""
    client = DVRewardClient("http://dvreward.test", transport=httpx.MockTransport(script), request_format="json",
                            **kwargs)
    sleeps: list[float] = []
    client._sleep = sleeps.append  # record instead of waiting
    return client, sleeps


def _score(client: DVRewardClient):
    return client.score(["p"], [[b"\x89PNG fake"]], questions=[Q])


def test_429_honours_retry_after_with_one_key():
    script = Script(_error(429, "rate_limited", "3"), httpx.Response(200, json=OK))
    client, sleeps = _client(script, backoff_base=0.1)
    result = _score(client)
    assert result.flat_rewards() == [0.5]
    assert len(script.requests) == 2 and len(sleeps) == 1
    assert 3.0 <= sleeps[0] <= 3.1  # at least Retry-After; full jitter adds at most backoff_base
    keys = {r.headers["Idempotency-Key"] for r in script.requests}
    assert len(keys) == 1 and uuid.UUID(keys.pop()).version == 4
    assert script.requests[0].content == script.requests[1].content  # same body, or the key would not replay


def test_503_and_transport_errors_are_retried_with_capped_jittered_backoff():
    script = Script(_error(503, "unavailable"), httpx.ConnectError("refused"), _error(503, "unavailable"),
                    httpx.Response(200, json=OK))
    client, sleeps = _client(script, backoff_base=0.5, backoff_max=1.5)
    assert _score(client).flat_rewards() == [0.5]
    assert len(script.requests) == 4
    caps = [0.5, 1.0, 1.5]  # base * 2**attempt, capped by backoff_max
    assert all(0.0 <= s <= c for s, c in zip(sleeps, caps, strict=True))


def test_max_retries_is_respected():
    script = Script(_error(503, "unavailable", "1"))
    client, sleeps = _client(script, max_retries=3, backoff_base=0.01)
    with pytest.raises(Unavailable) as info:
        _score(client)
    assert len(script.requests) == 4 and len(sleeps) == 3
    err = info.value
    assert (err.status, err.code, err.request_id, err.retry_after) == (503, "unavailable", "rid-503", 1.0)
    assert "unavailable happened" in str(err)


def test_transport_errors_exhausted_raise_connection_failed():
    script = Script(httpx.ConnectError("connection refused"))
    client, _ = _client(script, max_retries=2, backoff_base=0.01)
    with pytest.raises(ConnectionFailed) as info:
        _score(client)
    assert len(script.requests) == 3 and info.value.status is None
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    script = Script(httpx.ReadTimeout("slow"))
    client, _ = _client(script, max_retries=1, backoff_base=0.01)
    with pytest.raises(TransportTimeout) as timed_out:
        _score(client)
    assert len(script.requests) == 2 and timed_out.value.code == "client_timeout"


@pytest.mark.parametrize(("status", "code", "cls"), [
    (422, "bad_image", BadRequest), (401, "unauthorized", Unauthorized), (413, "too_large", PayloadTooLarge),
    (404, "not_found", BadRequest), (500, "internal", ServerError), (502, "verification_failed", ServerError),
    (504, "timeout", DeadlineExceeded),
])
def test_errors_that_are_not_retried(status, code, cls):
    script = Script(_error(status, code))
    client, sleeps = _client(script)
    with pytest.raises(cls) as info:
        _score(client)
    assert len(script.requests) == 1 and sleeps == []
    assert (info.value.status, info.value.code, info.value.request_id) == (status, code, f"rid-{status}")


def test_rate_limited_after_retries_and_non_json_errors():
    script = Script(_error(429, "rate_limited", "2"))
    client, sleeps = _client(script, max_retries=1)
    with pytest.raises(RateLimited) as info:
        _score(client)
    assert info.value.retry_after == 2.0 and sleeps[0] >= 2.0
    script = Script(httpx.Response(502, text="<html>bad gateway</html>"))
    client, _ = _client(script)
    with pytest.raises(ServerError, match="bad gateway"):
        _score(client)


def test_each_logical_request_gets_its_own_key_and_auth_header():
    script = Script(httpx.Response(200, json=OK))
    client, _ = _client(script, api_key="secret")
    _score(client)
    _score(client)
    assert script.requests[0].headers["Idempotency-Key"] != script.requests[1].headers["Idempotency-Key"]
    assert script.requests[0].headers["Authorization"] == "Bearer secret"


def test_retry_after_formats():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after(later) <= 31


async def test_async_client_retries():
    script = Script(_error(429, "rate_limited", "2"), httpx.ReadError("lost"), httpx.Response(200, json=OK))
    sleeps: list[float] = []

    async def record(s: float) -> None:
        sleeps.append(s)

    async with AsyncDVRewardClient("http://dvreward.test", transport=httpx.MockTransport(script),
                                   backoff_base=0.1, request_format="json") as client:
        client._sleep = record
        result = await client.score(["p"], [[b"\x89PNG fake"]], questions=[Q])
    assert result.flat_rewards() == [0.5]
    assert len(script.requests) == 3 and sleeps[0] >= 2.0 and sleeps[1] <= 0.2
    assert len({r.headers["Idempotency-Key"] for r in script.requests}) == 1
