"""FLUSHALL under load (an operator's slip, or a Redis restarted empty): a worker blocked on its stream is told
UNBLOCKED, makes its consumer group again and goes on serving; a request whose tasks were flushed fails at once
with 503 instead of waiting out its deadline."""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import redis

DEADLINE_S = 60


def blocked_reading(admin: redis.Redis) -> bool:
    return any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "") for c in admin.client_list())


def test_flushall_under_load_keeps_workers_serving_and_fails_the_lost_requests_fast(
    private_redis: Any, services: Callable[..., Any], tiny_models: dict[str, Path], kit: types.SimpleNamespace,
) -> None:
    common = dict(redis_url=private_redis.url, heartbeat_s=1, request_timeout_s=DEADLINE_S)
    api = services("api", "api", kit.service_env(**common), http=True)
    # Idle reads block 0.5 s: the flush finds the worker inside one. It has no decomposer: a prompt's task waits.
    worker = services("worker", "worker", kit.service_env(**common, verifier=tiny_models["verifier"], decomposer="",
                                                           batch_wait_ms=500))
    api.wait_http("/readyz")
    admin = redis.Redis.from_url(private_redis.url)
    verify = {"items": [{"images": [kit.png_b64(i)], "questions": ["Is it red?"]} for i in range(2)]}
    seen: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=api.url, timeout=90) as client:
            while not stop.is_set():
                seen.append(client.post("/v1/verify", json=verify).status_code)
                time.sleep(0.2)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        with ThreadPoolExecutor(1) as pool:
            lost = pool.submit(httpx.post, api.url + "/v1/score", timeout=90, json={
                "groups": [{"prompt": "a red cat", "images": [kit.png_b64(9)]}]})
            kit.wait_for(lambda: admin.xlen("dvr:stream:decompose") == 1, 30, "the prompt's task to be queued")
            kit.wait_for(lambda: seen.count(200) >= 3, 60, "the load to be served")
            kit.wait_for(lambda: blocked_reading(admin), 30, "the worker to block on its stream", interval=0.005)
            admin.flushall()
            flushed = time.monotonic()
            answer = lost.result(timeout=DEADLINE_S + 30)
            waited = time.monotonic() - flushed
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "unavailable" and "lost" in answer.json()["error"]["message"]
        assert int(answer.headers["Retry-After"]) >= 1
        assert waited < 10, f"the request whose task was flushed waited {waited:.0f} s"

        kit.wait_for(lambda: httpx.get(api.url + "/readyz", timeout=5).status_code == 200, 30,
                     "the worker to register again")
        served = seen.count(200)
        kit.wait_for(lambda: seen.count(200) >= served + 5, 60, "the load to be served after the flush")
    finally:
        stop.set()
        loader.join(timeout=120)
        admin.close()
    assert worker.alive(), worker.log_tail()
    log = worker.log_tail(200_000)
    assert "Traceback" not in log and "consumer group is gone (UNBLOCKED" in log, log
    assert set(seen) <= {200, 503}, seen
