"""A frozen Redis (SIGSTOP: the process is there, the socket accepts, nothing answers) is a quick 503,
not a hang, and the service recovers on SIGCONT without a restart."""

from __future__ import annotations

import os
import signal
import threading
import time
import types
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service_stack import drop_service_settings


def test_frozen_redis_is_a_503_within_seconds_and_readyz_within_one(
    private_redis: Any, kit: types.SimpleNamespace, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from server.runtime import build_app
    from server.settings import Settings

    drop_service_settings(monkeypatch)
    s = Settings(verifier=str(tiny_models["verifier"]), decomposer="", redis_url=private_redis.url,
                 redis_timeout_s=1.0, request_timeout_s=60)
    body = {"items": [{"images": [kit.png_b64(1)], "questions": ["Is it red?"]}]}
    with kit.serve_in_thread(build_app(s, None)) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert "no live worker" in c.get("/readyz").json()["error"]["message"], "queue up, no worker yet"
        in_flight: dict[str, Any] = {}

        def send() -> None:  # no worker: the request waits for its results in Redis
            in_flight["response"] = c.post("/v1/verify", json=body)
            in_flight["done"] = time.monotonic()

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(1.0)
        assert "response" not in in_flight
        os.kill(private_redis.proc.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        t0 = time.monotonic()
        ready = c.get("/readyz")
        assert ready.status_code == 503 and time.monotonic() - t0 < 1.5, (ready.text, time.monotonic() - t0)
        sender.join(timeout=20)
        r = in_flight["response"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable", r.text
        assert in_flight["done"] - frozen < 5, "the in-flight request hung on a frozen Redis"

        os.kill(private_redis.proc.pid, signal.SIGCONT)
        # recovered without a restart: the queue answers again (only the worker is missing)
        kit.wait_for(lambda: "no live worker" in c.get("/readyz").text, 10, "the queue to answer again")
