"""Fail fast and keep finished work: no live worker is a 503 at once (not a 504 at the deadline), and a
decomposition that finishes after its request's deadline is cached for the retry."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from dvreward_protocol.schemas import WorkerInfo
from server.errors import ErrorCode, ServiceError
from server.liveness import WorkerWatch
from server.queue.messages import TaskKind
from server.runtime import build_broker, build_service, load_decomposer, running
from server.settings import Settings
from server.worker import Worker
from tests.service_stack import drop_service_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_watch_allows_the_grace_then_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    drop_service_settings(monkeypatch)
    broker = build_broker(Settings(verifier="v", decomposer=""))
    clock = Clock()
    watch = WorkerWatch(broker, grace_s=10, clock=clock)
    info = dict(worker_id="w", verifier="v", decomposer=None, pipeline=None, template_version="t", capacity=1,
                started_at=0.0, heartbeat_at=0.0)
    clock.now += 9.9
    await watch.require(TaskKind.verify)  # no worker yet, but within the grace from start
    clock.now += 0.6
    with pytest.raises(ServiceError) as info_exc:
        await watch.require(TaskKind.verify)
    assert info_exc.value.code is ErrorCode.unavailable
    assert "no live worker with a verifier for 10 s" in str(info_exc.value)
    assert info_exc.value.retry_after == 5.0
    await broker.heartbeat(WorkerInfo(**info), ttl=60)  # a verifier-only worker
    clock.now += 1  # past the registry cache
    await watch.require(TaskKind.verify)
    with pytest.raises(ServiceError, match="with a decomposer"):
        await watch.require(TaskKind.decompose)  # it cannot decompose: still none for 11.5 s


def test_no_worker_is_a_503_at_once_and_a_vanished_one_stops_the_wait(
    private_redis: Any, services: Any, tiny_models: dict[str, Path], kit: types.SimpleNamespace,
) -> None:
    env = kit.service_env(redis_url=private_redis.url, verifier=tiny_models["verifier"], decomposer="",
                          worker_grace_s=1, heartbeat_s=0.5, request_timeout_s=60)
    api = services("api", "api", env, http=True)
    api.wait_http("/healthz")
    body = {"groups": [{"questions": kit.explicit_questions(), "images": [kit.png_b64(1)]}]}
    with httpx.Client(base_url=api.url, timeout=90) as client:
        t0 = time.monotonic()
        refused = client.post("/v1/score", json=body)
        assert refused.status_code == 503 and refused.headers["Retry-After"], refused.text
        assert "no live worker with a verifier" in refused.json()["error"]["message"]
        assert time.monotonic() - t0 < 10, "at admission, not at the 60 s deadline"

        worker = services("worker", "worker", env)
        kit.wait_for(lambda: client.get("/readyz").status_code == 200, kit.STARTUP_S, "the worker")
        assert client.post("/v1/score", json=body).status_code == 200
        worker.signal(signal.SIGSTOP)  # alive but silent: its heartbeat stops, the request's task waits
        try:
            t0 = time.monotonic()
            stranded = client.post("/v1/score", json=body)
            waited = time.monotonic() - t0
        finally:
            worker.signal(signal.SIGCONT)
    assert stranded.status_code == 503, stranded.text
    assert waited < 20, f"the wait stopped {waited:.1f} s in: its worker's record expired (1.5 s) and the grace (1 s)"


class Slow:
    """The real decomposer, slower than the request's deadline."""

    def __init__(self, inner: Any, seconds: float) -> None:
        self.inner, self.seconds, self.calls = inner, seconds, 0
        self.model_id, self.pipeline = inner.model_id, inner.pipeline

    def decompose_each(self, prompts: Sequence[str], *, editing: bool = False) -> list[Any]:
        self.calls += 1
        threading.Event().wait(self.seconds)
        return self.inner.decompose_each(prompts, editing=editing)


async def test_a_decomposition_finishing_after_the_deadline_is_cached(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    drop_service_settings(monkeypatch)
    settings = Settings(verifier=str(tiny_models["verifier"]), decomposer=str(tiny_models["decomposer"]),
                        request_timeout_s=1)
    decomposer = Slow(await asyncio.to_thread(load_decomposer, settings), seconds=2.5)
    broker = build_broker(settings)
    service = build_service(settings, broker)
    worker = Worker(broker, None, decomposer, template_version="t", batch_size=4, batch_wait=0.01, heartbeat_s=0.5,
                    batch_timeout_s=60, max_image_pixels=10**7)
    async with running(worker):
        with pytest.raises(ServiceError) as late:
            await service.decompose_one("a red cat on a blue sofa", service.deadline())
        assert late.value.code is ErrorCode.timeout
        for _ in range(100):  # the worker finishes 1.5 s after the deadline; its work is published then
            await asyncio.sleep(0.1)
            if not service._late:
                break
        again = await service.decompose_one("a red cat on a blue sofa", service.deadline())
    assert again.cached and again.decomposition.questions and decomposer.calls == 1, \
        "the retry is the late work, not new work"
