"""`dvreward worker-health`, the worker image's HEALTHCHECK, against a real Redis: healthy only while a worker of
this host has a live heartbeat in the registry."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import pytest

from dvreward_protocol.schemas import WorkerInfo
from server.runtime import build_broker
from server.settings import Settings
from server.worker import new_worker_id, runs_on
from tests.service_stack import drop_service_settings, free_port, service_env


def test_runs_on_tells_hosts_apart_even_with_dashes() -> None:
    assert runs_on(new_worker_id(), socket.gethostname())
    assert runs_on("host-a-12-0a1b2c", "host-a")
    assert not runs_on("host-a-b-12-0a1b2c", "host-a") and not runs_on("host-a-12-0a1b2c", "host")


def _health(redis_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", "worker-health"], capture_output=True, text=True,
                          env=service_env(redis_url=redis_url, redis_timeout_s=1), timeout=60)


def _register(redis_url: str, *worker_ids: str) -> None:
    async def beat() -> None:
        broker = build_broker(Settings(redis_url=redis_url))
        try:
            for wid in worker_ids:
                now = time.time()
                info = WorkerInfo(worker_id=wid, verifier="v", decomposer=None, pipeline=None, template_version="t",
                                  capacity=1, started_at=now, heartbeat_at=now)
                await broker.heartbeat(info, ttl=60)
        finally:
            await broker.close()

    asyncio.run(beat())


def test_healthy_only_with_a_live_worker_of_this_host(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    drop_service_settings(monkeypatch)
    empty = _health(redis_url)
    assert empty.returncode == 1 and "no worker of host" in empty.stderr, empty.stderr
    _register(redis_url, "elsewhere-7-abcdef")
    other = _health(redis_url)
    assert other.returncode == 1 and "(1 of other hosts do)" in other.stderr, other.stderr
    mine = new_worker_id()
    _register(redis_url, mine)
    ok = _health(redis_url)
    assert ok.returncode == 0 and mine in ok.stdout, ok.stderr


def test_unhealthy_when_redis_does_not_answer() -> None:
    out = _health(f"redis://127.0.0.1:{free_port()}/0")
    assert out.returncode == 1 and "unhealthy: the queue (Redis) is unreachable" in out.stderr, out.stderr
