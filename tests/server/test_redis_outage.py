"""Redis dies under a running API and worker: clear 503s, nobody crashes, and service resumes on restart."""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.tolerance import assert_rewards_close


def test_redis_outage_gives_503_and_service_resumes_after_restart(
    private_redis: Any, services: Callable[..., Any], tiny_models: dict[str, Path], kit: types.SimpleNamespace,
) -> None:
    common = dict(redis_url=private_redis.url, heartbeat_s=1, request_timeout_s=60)
    api = services("api", "api", kit.service_env(**common), http=True)
    worker = services("worker", "worker", kit.service_env(**common, verifier=tiny_models["verifier"], decomposer=""))
    api.wait_http("/readyz")
    body = {"groups": [{"questions": kit.explicit_questions(), "images": [kit.png_b64(1), kit.png_b64(2)]}]}
    client = httpx.Client(base_url=api.url, timeout=60)
    try:
        before = client.post("/v1/score", json=body)
        assert before.status_code == 200, before.text

        private_redis.kill()
        for path, send in (("/v1/score", lambda: client.post("/v1/score", json=body)),
                           ("/v1/verify", lambda: client.post("/v1/verify", json={
                               "items": [{"images": [kit.png_b64(1)], "questions": ["Is it red?"]}]})),
                           ("/readyz", lambda: client.get("/readyz"))):
            r = send()
            assert r.status_code == 503, (path, r.text)
            error = r.json()["error"]
            assert error["code"] == "unavailable"
            assert "Redis" in error["message"] and "unreachable" in error["message"], error["message"]
            assert int(r.headers["Retry-After"]) >= 1
        assert client.get("/healthz").status_code == 200, "liveness does not depend on Redis"
        kit.wait_for(lambda: "(Redis) is unreachable" in worker.log_tail(50_000), 30,
                     "the worker to log the outage")
        assert api.alive(), api.log_tail()
        assert worker.alive(), worker.log_tail()

        private_redis.start()  # same port, empty: no streams, no consumer group, no worker record
        kit.wait_for(lambda: client.get("/readyz").status_code == 200, 60, "/readyz after the restart",
                     interval=0.2)
        after = client.post("/v1/score", json=body)
        assert after.status_code == 200, after.text
        assert_rewards_close([after.json()["groups"][0]["rewards"]], [before.json()["groups"][0]["rewards"]])
        assert worker.alive(), worker.log_tail()
    finally:
        client.close()
