"""Admission control and deadlines over real HTTP: a full queue is 429 with Retry-After, a request nobody
serves in time is 504; the trainer client maps both onto its typed errors."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from trainer_client import DeadlineExceeded, DVRewardClient, RateLimited


def test_full_queue_is_429_and_a_late_request_is_504(redis_url: str, services: Callable[..., Any],
                                                     kit: types.SimpleNamespace) -> None:
    # No worker: whatever is admitted stays queued, so the queue's depth is exactly what was sent.
    api = services("api", "api", kit.service_env(redis_url=redis_url, max_queue=2, request_timeout_s=2), http=True)
    api.wait_http("/healthz")
    questions = kit.explicit_questions()

    def body(n: int) -> dict[str, Any]:
        return {"groups": [{"questions": questions, "images": [kit.png_b64(s) for s in range(n)]}]}

    with httpx.Client(base_url=api.url, timeout=30) as http:
        late = http.post("/v1/score", json=body(1))  # admitted, never served
        assert late.status_code == 504, late.text
        assert late.json()["error"]["code"] == "timeout" and late.json()["request_id"]
        full = http.post("/v1/score", json=body(2))  # the late request's task still holds one of the two places
        assert full.status_code == 429, full.text
        assert full.json()["error"]["code"] == "rate_limited" and float(full.headers["Retry-After"]) > 0
        never = http.post("/v1/score", json=body(3))  # more than the whole queue: retrying cannot help
        assert never.status_code == 413 and never.json()["error"]["code"] == "too_large", never.text

    with DVRewardClient(api.url, max_retries=0) as client:
        with pytest.raises(RateLimited) as limited:
            client.score([None], [[kit.png_bytes(s) for s in range(2)]], questions=[questions])
        assert limited.value.status == 429 and limited.value.retry_after is not None
    with DVRewardClient(api.url, max_retries=0) as client:
        with pytest.raises(DeadlineExceeded) as timed_out:
            client.verify([kit.png_bytes(9)], ["Is there a cat?"])  # the second place: admitted, never served
        assert timed_out.value.status == 504
