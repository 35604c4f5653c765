"""Redis refuses writes for a while under load (maxmemory reached, noeviction): the API answers 503 with
Retry-After, never a 500; the worker retries with backoff instead of dying or living on without its loops; once
Redis takes writes again, the service recovers by itself, with no restart by hand."""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis

REFUSED_S = 8.0  # longer than a heartbeat TTL (3 x 1 s): the worker drops out of /readyz, then must come back


def test_redis_refusing_writes_under_load_is_503_and_the_service_recovers_by_itself(
    private_redis: Any, services: Callable[..., Any], tiny_models: dict[str, Path], kit: types.SimpleNamespace,
) -> None:
    common = dict(redis_url=private_redis.url, heartbeat_s=1, request_timeout_s=30, redis_timeout_s=1)
    api = services("api", "api", kit.service_env(**common), http=True)
    worker = services("worker", "worker", kit.service_env(**common, verifier=tiny_models["verifier"], decomposer=""))
    api.wait_http("/readyz")
    body = {"items": [{"images": [kit.png_b64(i)], "questions": ["Is it red?"]} for i in range(4)]}
    seen: list[tuple[int, str, str | None]] = []  # status, error code, Retry-After of every load response
    stop = threading.Event()

    def load(n: int) -> None:
        with httpx.Client(base_url=api.url, timeout=60) as client:
            while not stop.is_set():
                key = {"Idempotency-Key": f"load-{n}-{len(seen)}"} if n == 0 else {}  # single-flight writes too
                r = client.post("/v1/verify", json=body, headers=key)
                code = r.json()["error"]["code"] if r.status_code != 200 else ""
                seen.append((r.status_code, code, r.headers.get("Retry-After")))
                if r.status_code == 503:
                    time.sleep(0.2)

    admin = redis.Redis.from_url(private_redis.url)
    admin.config_set("maxmemory-policy", "noeviction")
    threads = [threading.Thread(target=load, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    try:
        kit.wait_for(lambda: sum(s == 200 for s, _, _ in seen) >= 6, 60, "the load to be served")
        admin.config_set("maxmemory", 1)
        try:
            during = httpx.post(api.url + "/v1/verify", json=body, timeout=60)
            assert during.status_code == 503, during.text
            assert during.json()["error"]["code"] == "unavailable" and "out of memory" in during.text
            assert int(during.headers["Retry-After"]) >= 1
            kit.wait_for(lambda: httpx.get(api.url + "/readyz", timeout=5).status_code == 503, 30,
                         "/readyz to lose the worker whose heartbeats Redis refuses")
            time.sleep(REFUSED_S)
        finally:
            admin.config_set("maxmemory", 0)
        kit.wait_for(lambda: httpx.get(api.url + "/readyz", timeout=5).status_code == 200, 60,
                     "/readyz once Redis takes writes again", interval=0.5)
        after = httpx.post(api.url + "/v1/verify", json=body, timeout=60)
        assert after.status_code == 200, after.text
        assert all(r["p"] is not None for r in after.json()["results"])
        served = sum(s == 200 for s, _, _ in seen)
        kit.wait_for(lambda: sum(s == 200 for s, _, _ in seen) >= served + 6, 60, "the load to be served again")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
        admin.close()
    assert worker.alive() and api.alive(), worker.log_tail() + api.log_tail()
    assert "Traceback" not in worker.log_tail(200_000), worker.log_tail()
    assert [s for s in seen if s[0] not in (200, 503)] == [], "a Redis refusing writes is a 503, not a fault or a wait"
    assert all(s == (503, "unavailable", "2") for s in seen if s[0] == 503)
