"""The clients' retry core on its own: a flow driven by a script of outcomes, no network and no clock."""

from __future__ import annotations

import random

import httpx
import pytest

from trainer_client import BadRequest, ConnectionFailed, Unavailable
from trainer_client.flow import Backoff, Send, Sleep, request

SEND = Send("POST", "/v1/score", b"{}", {"Idempotency-Key": "k"})


def _answer(status: int, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after else {}
    return httpx.Response(status, json={"error": {"code": "x", "message": "m"}}, headers=headers)


def test_retries_decide_waits_and_resend_the_same_request():
    flow = request(SEND, Backoff(max_retries=3, base=1.0, cap=3.0, rng=random.Random(0)))
    assert next(flow) is SEND
    wait = flow.send(_answer(503, "2"))
    assert isinstance(wait, Sleep) and wait.seconds >= 2.0  # at least Retry-After
    assert flow.send(None) is SEND  # the same body and Idempotency-Key again
    wait = flow.throw(httpx.ConnectError("refused"))
    assert isinstance(wait, Sleep) and 0.0 <= wait.seconds <= 2.0  # full jitter under base * 2**1
    assert flow.send(None) is SEND
    with pytest.raises(StopIteration) as done:
        flow.send(httpx.Response(200, json={}))
    assert done.value.value.status_code == 200


def test_gives_up_on_errors_that_cannot_heal_and_after_the_last_retry():
    flow = request(SEND, Backoff(max_retries=3))
    next(flow)
    with pytest.raises(BadRequest):
        flow.send(_answer(422))
    flow = request(SEND, Backoff(max_retries=1, base=0.01))
    next(flow)
    assert isinstance(flow.throw(httpx.ConnectError("refused")), Sleep)
    next(flow)
    with pytest.raises(ConnectionFailed) as info:
        flow.throw(httpx.ConnectError("refused"))
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    flow = request(SEND, None)  # probes never retry
    next(flow)
    with pytest.raises(Unavailable):
        flow.send(_answer(503))
