"""The API's /metrics reports the queue as an autoscaler reads it (length, pending, lag per stream), read at
scrape time from the broker, over real HTTP against both brokers; and /readyz?require_worker=false, the probe
for workers scaled to zero."""

from __future__ import annotations

import asyncio
import threading
import types
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.queue.messages import TaskKind
from server.runtime import build_broker
from server.settings import Settings
from tests.service_stack import drop_service_settings


def samples(text: str) -> dict[tuple[str, str], float]:
    """(metric name, its `stream` label) -> value, for the dvreward_queue_ series of a scrape."""
    return {(s.name, s.labels.get("stream", "")): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name.startswith("dvreward_queue_")}


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_metrics_report_the_queue_read_at_scrape_time(
    backend: str, request: pytest.FixtureRequest, kit: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from server.runtime import build_app

    drop_service_settings(monkeypatch)
    url = request.getfixturevalue("redis_url") if backend == "redis" else None
    s = Settings(redis_url=url, request_timeout_s=6)
    body = {"items": [{"images": [kit.png_b64(i)], "questions": ["Is it red?"]} for i in range(3)]}
    with kit.serve_in_thread(build_app(s, None)) as base, httpx.Client(base_url=base, timeout=30) as c:
        idle = samples(c.get("/metrics").text)
        assert idle[("dvreward_queue_up", "")] == 1
        for kind in TaskKind:
            for name in ("length", "pending", "lag"):
                assert idle[(f"dvreward_queue_{name}", kind.value)] == 0, (name, kind)
        assert c.get("/readyz").status_code == 503, "no worker yet"
        ready = c.get("/readyz", params={"require_worker": "false"})
        assert ready.status_code == 200 and ready.json()["workers"] == 0, "the scale-to-zero probe needs no worker"

        answer: dict[str, httpx.Response] = {}
        sender = threading.Thread(target=lambda: answer.setdefault("r", c.post("/v1/verify", json=body)))
        sender.start()  # no worker: its three tasks wait in the queue until the deadline
        try:
            queued = kit.wait_for(lambda: (m := samples(c.get("/metrics").text)).get(
                ("dvreward_queue_length", "verify")) == 3 and m, 10, "three queued tasks in /metrics")
            assert queued[("dvreward_queue_lag", "verify")] == 3 and queued[("dvreward_queue_pending", "verify")] == 0
            assert queued[("dvreward_queue_length", "decompose")] == 0
            if backend == "redis":  # a worker's claim moves one task from the lag to the pending entries
                claimed = asyncio.run(claim_one(s))
                assert claimed == 1
                after = samples(c.get("/metrics").text)
                assert after[("dvreward_queue_pending", "verify")] == 1 and after[("dvreward_queue_lag", "verify")] == 2
                assert after[("dvreward_queue_length", "verify")] == 3
        finally:
            sender.join(timeout=30)
        assert answer["r"].status_code == 504, answer["r"].text


async def claim_one(s: Settings) -> int:
    broker = build_broker(s, "metrics-test-worker")
    try:
        return len(await broker.claim(TaskKind.verify, 1, 1.0))
    finally:
        await broker.close()


def test_metrics_without_redis_say_the_queue_is_down_and_invent_nothing(
    private_redis: Any, kit: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from server.runtime import build_app

    drop_service_settings(monkeypatch)
    s = Settings(redis_url=private_redis.url, redis_timeout_s=1.0)
    with kit.serve_in_thread(build_app(s, None)) as base, httpx.Client(base_url=base, timeout=30) as c:
        assert samples(c.get("/metrics").text)[("dvreward_queue_up", "")] == 1
        private_redis.kill()
        r = c.get("/metrics")
        assert r.status_code == 200, "the API's own metrics are still served"
        assert samples(r.text) == {("dvreward_queue_up", ""): 0}, "no stale or zero queue gauges"
        assert "dvreward_requests_total" in r.text
        assert c.get("/readyz", params={"require_worker": "false"}).status_code == 503
