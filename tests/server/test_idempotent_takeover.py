"""An API is SIGKILLed in the middle of a request that carries an Idempotency-Key, and the client retries on another
API replica over the same Redis. The dead API's lock lapses within DVREWARD_LOCK_TTL_S (its owner renewed it, and
is gone) instead of living until the request's deadline: the retry is answered within seconds, and concurrent
retries are scored once."""

from __future__ import annotations

import signal
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import redis

LOCK_TTL_S = 2


def test_a_retry_after_the_api_died_takes_over_within_seconds_and_is_scored_once(
    private_redis: Any, services: Callable[..., Any], tiny_models: dict[str, Path], kit: types.SimpleNamespace,
) -> None:
    common = dict(redis_url=private_redis.url, heartbeat_s=1, request_timeout_s=60, redis_timeout_s=1,
                  lock_ttl_s=LOCK_TTL_S)
    first = services("api-1", "api", kit.service_env(**common), http=True)
    second = services("api-2", "api", kit.service_env(**common), http=True)
    worker = services("worker", "worker", kit.service_env(**common, verifier=tiny_models["verifier"], decomposer=""))
    first.wait_http("/readyz")
    second.wait_http("/readyz")
    admin = redis.Redis.from_url(private_redis.url)
    body = {"groups": [{"questions": kit.explicit_questions(), "images": [kit.png_b64(1), kit.png_b64(2)]}]}
    key = {"Idempotency-Key": "step-7"}

    def post(api: Any) -> httpx.Response:
        return httpx.post(api.url + "/v1/score", json=body, headers=key, timeout=90)

    worker.signal(signal.SIGSTOP)  # the first attempt waits for its results: it is in flight when its API dies
    try:
        with ThreadPoolExecutor(3) as pool:
            pool.submit(post, first)
            kit.wait_for(lambda: list(admin.scan_iter("dvr:sf:lock:idem:*")), 30, "the first attempt to take its lock")
            first.signal(signal.SIGKILL)
            assert first.wait(10) == -signal.SIGKILL
            worker.signal(signal.SIGCONT)
            t0 = time.monotonic()
            retries = [pool.submit(post, second) for _ in range(2)]
            answers = [f.result(timeout=120) for f in retries]
            took = time.monotonic() - t0
    finally:
        worker.signal(signal.SIGCONT)
        admin.close()
    for r in answers:
        assert r.status_code == 200, r.text
        assert all(x is not None for x in r.json()["groups"][0]["rewards"]), r.text
    assert took < LOCK_TTL_S + 10, f"the retries took {took:.1f} s: the dead API's lock outlived it"
    replayed = [r.headers.get("Idempotent-Replayed") for r in answers]
    assert replayed.count("true") == 1 and replayed.count(None) == 1, f"scored once, replayed once: {replayed}"
    assert answers[0].json() == answers[1].json(), "both retries carry the one scoring's response"
    again = post(second)
    assert again.headers.get("Idempotent-Replayed") == "true" and again.json() == answers[0].json()
