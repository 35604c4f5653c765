"""The clients' retry core on its own: a flow driven by a script of outcomes, no network and no clock."""

from __future__ import annotations

import random
import re

import httpx
import pytest

from trainer_client import (
    AsyncDVRewardClient,
    BadRequest,
    ConfigurationError,
    ConnectionFailed,
    DeadlineExceeded,
    DVRewardClient,
    TransportTimeout,
    Unavailable,
    errors,
)
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


# ---- errors that can never succeed fail at once, and the error tree says which is which ------------------------
@pytest.mark.parametrize("failure", [httpx.UnsupportedProtocol("Request URL has an unsupported protocol 'localhost'"),
                                     httpx.LocalProtocolError("Illegal header value"), httpx.InvalidURL("bad")])
def test_a_request_that_cannot_be_sent_is_not_retried(failure: Exception) -> None:
    """A base URL without a scheme was retried 5 times (UnsupportedProtocol is a transport error)."""
    flow = request(SEND, Backoff(max_retries=5))
    next(flow)
    with pytest.raises(ConfigurationError) as info:
        flow.throw(failure)
    assert info.value.__cause__ is failure and not info.value.retryable and "(not sent)" in str(info.value)


def test_a_504_is_not_retried_and_a_client_timeout_is() -> None:
    """`Timeout` was both: a 504 (not retried) and a transport timeout (retried, marked on the instance)."""
    flow = request(SEND, Backoff(max_retries=3))
    next(flow)
    with pytest.raises(DeadlineExceeded) as late:
        flow.send(_answer(504))
    assert late.value.status == 504 and not isinstance(late.value, TransportTimeout)
    flow = request(SEND, Backoff(max_retries=3, base=0.01))
    next(flow)
    assert isinstance(flow.throw(httpx.ReadTimeout("slow")), Sleep)
    assert TransportTimeout.retryable and not DeadlineExceeded.retryable
    assert issubclass(TransportTimeout, ConnectionFailed)


@pytest.mark.parametrize(("url", "says"), [
    ("127.0.0.1:8000", "did you mean 'http://127.0.0.1:8000'"), ("localhost:8000", "did you mean"),
    ("ftp://host", "http:// or https://"), ("http://", "with a host"), ("http://host:99999", "port 99999"),
])
def test_a_base_url_that_cannot_work_fails_when_the_client_is_made(url: str, says: str) -> None:
    for cls in (DVRewardClient, AsyncDVRewardClient):
        with pytest.raises(ConfigurationError, match=re.escape(says)):
            cls(url)
    assert DVRewardClient("HTTPS://example.test:8443/").base_url == "HTTPS://example.test:8443"


def _tree() -> list[tuple[int, str, bool]]:
    """(depth, class name, marked retryable) of each line of the tree in the errors module's docstring."""
    out = []
    for line in (errors.__doc__ or "").splitlines():
        m = re.match(r"^    ((?:│   |    )*)(?:[├└]── )?([A-Z]\w+)( \*)?\s", line + " ")
        if m and hasattr(errors, m.group(2)):
            out.append((len(m.group(1)) // 4 + (1 if "── " in line else 0), m.group(2), bool(m.group(3))))
    return out


def test_the_docstring_tree_is_the_class_tree() -> None:
    """Every error class is drawn once, under its base, marked * exactly when it is retried."""
    tree = _tree()
    classes = {name for name, obj in vars(errors).items()
               if isinstance(obj, type) and issubclass(obj, errors.DVRewardError)}
    assert sorted(name for _, name, _ in tree) == sorted(classes)
    parents: list[str] = []
    for depth, name, marked in tree:
        cls = getattr(errors, name)
        parents[depth:] = [name]
        if depth:
            assert cls.__bases__ == (getattr(errors, parents[depth - 1]),), name
        assert cls.retryable is marked, name
