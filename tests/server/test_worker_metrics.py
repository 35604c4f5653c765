"""A worker's own port: each metric moves when its event happens (a real `dvreward worker` with the tiny verifier
over a private Redis), /readyz follows the worker's state, and GPU memory is reported only where CUDA runs."""

from __future__ import annotations

import asyncio
import signal
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.queue.messages import DecomposePayload, Result, Task, VerifyPayload
from server.runtime import build_broker
from server.settings import Settings
from server.worker import Worker
from server.worker_metrics import WorkerMetrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(base: str) -> Samples:
    r = httpx.get(base + "/metrics", timeout=5)
    assert r.status_code == 200, r.text
    return parse(r.text)


async def run_tasks(url: str, tasks: list[Task]) -> dict[str, Result]:
    broker = build_broker(Settings(redis_url=url), "metrics-test-api")
    try:
        await broker.submit(tasks)
        return await broker.gather(tasks[0].reply_to, {t.task_id for t in tasks}, time.time() + 60)
    finally:
        await broker.close()


def test_each_worker_metric_moves_with_its_event_and_readyz_follows_the_queue(
    private_redis: Any, services: Callable[..., Any], tiny_models: dict[str, Path], kit: types.SimpleNamespace,
) -> None:
    port = kit.free_port()
    env = kit.service_env(redis_url=private_redis.url, verifier=tiny_models["verifier"],
                          decomposer=tiny_models["decomposer"],
                          heartbeat_s=0.5, batch_size=8, batch_wait_ms=100, worker_metrics_port=port)
    worker = services("worker", "worker", env)
    base = f"http://{kit.HOST}:{port}"

    def ready() -> bool:
        assert worker.alive(), worker.log_tail()
        try:
            return httpx.get(base + "/readyz", timeout=2).status_code == 200
        except httpx.TransportError:  # the port opens once the models are loaded
            return False

    kit.wait_for(ready, kit.STARTUP_S, "the worker's /readyz", interval=0.2)
    before = scrape(base)
    for role in ("verifier", "decomposer"):
        assert value(before, "dvreward_worker_engine_load_seconds", role=role) > 0
    (info,) = [dict(labels) for name, labels in before if name == "dvreward_worker_info"]
    assert f"-{worker.pid}-" in info["worker_id"] and info["verifier"].startswith("verifier@sha256:")
    assert not any(name.startswith("dvreward_worker_gpu_") for name, _ in before), "a CPU worker has no GPU memory"
    assert value(before, "dvreward_worker_batches_total", kind="verify") == 0
    assert value(before, "dvreward_worker_batches_total", kind="decompose") == 0

    whole = kit.png_bytes(3, (64, 64))
    now = time.time()
    tasks = [
        Task("m:two", "m", now + 60, VerifyPayload(questions=("Is there a cat?", "Is it red?")), [kit.png_bytes(1)]),
        Task("m:one", "m", now + 60, VerifyPayload(questions=("Is there a cat?",)), [kit.png_bytes(2)]),
        Task("m:bad", "m", now + 60, VerifyPayload(questions=("Is there a cat?",)), [whole[: len(whole) // 2]]),
        Task("m:old", "m", now - 1, VerifyPayload(questions=("Is there a cat?",)), [kit.png_bytes(4)]),
        Task("m:prompt", "m", now + 60, DecomposePayload(prompt="a red cat"), []),
    ]
    results = asyncio.run(run_tasks(private_redis.url, tasks))
    assert {t: (r.error.code.value if r.error else "ok") for t, r in results.items()} == {
        "m:two": "ok", "m:one": "ok", "m:bad": "bad_image", "m:old": "expired", "m:prompt": "ok"}

    after = scrape(base)
    batches = value(after, "dvreward_worker_batches_total", kind="verify")
    assert batches >= 1
    assert value(after, "dvreward_worker_batch_size_count", kind="verify") == batches
    assert value(after, "dvreward_worker_batch_size_sum", kind="verify") == 3, "expired tasks never reach the engine"
    assert value(after, "dvreward_worker_batch_seconds_count", kind="verify") == batches
    assert value(after, "dvreward_worker_batch_seconds_sum", kind="verify") > 0
    assert value(after, "dvreward_worker_batches_total", kind="decompose") >= 1
    assert value(after, "dvreward_worker_batch_size_sum", kind="decompose") == 1
    assert value(after, "dvreward_worker_batch_seconds_sum", kind="decompose") > 0
    assert value(after, "dvreward_worker_images_total") == 2
    assert value(after, "dvreward_worker_questions_total") == 3
    assert value(after, "dvreward_worker_p_source_total", source="logits") == 3
    assert value(after, "dvreward_worker_failures_total", code="bad_image") == 1
    assert value(after, "dvreward_worker_failures_total", code="expired") == 1
    for role in ("verifier", "decomposer"):
        assert value(after, "dvreward_worker_engine_load_seconds", role=role) == \
            value(before, "dvreward_worker_engine_load_seconds", role=role), "loaded once"

    private_redis.kill()  # its heartbeat cannot reach the queue: not ready, and says why
    down = kit.wait_for(lambda: (r := httpx.get(base + "/readyz", timeout=5)).status_code == 503 and r, 20,
                        "/readyz to fail without Redis")
    assert "heartbeat" in down.json()["reason"]
    private_redis.start()  # same port: the worker reconnects by itself
    kit.wait_for(ready, 30, "/readyz once Redis is back", interval=0.2)

    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.log_tail()
    with pytest.raises(httpx.TransportError):
        httpx.get(base + "/readyz", timeout=2)
    assert "Traceback" not in worker.log_tail(20_000)


async def test_readiness_follows_the_workers_life(tiny_verifier: Any) -> None:
    broker = build_broker(Settings(redis_url=None))  # in process
    worker = Worker(broker, tiny_verifier, None, template_version="test", batch_size=4, batch_wait=0.01,
                    heartbeat_s=0.1, batch_timeout_s=60, max_image_pixels=4096 * 4096)
    assert worker.readiness() == "not running yet"
    stop = asyncio.Event()
    run = asyncio.create_task(worker.run(stop))
    deadline = time.monotonic() + 10
    while worker.readiness() is not None:
        assert time.monotonic() < deadline, worker.readiness()
        await asyncio.sleep(0.01)
    stop.set()
    assert "draining" in (worker.readiness() or "")
    await asyncio.wait_for(run, 10)


def test_gpu_memory_is_absent_without_cuda_not_zero() -> None:
    import torch

    if torch.cuda.is_initialized():
        pytest.skip("CUDA is initialised in this process: the absence cannot be observed")
    text = generate_latest(WorkerMetrics("cuda:0").registry).decode()
    assert "dvreward_worker_gpu_memory" not in text


def test_gpu_memory_of_the_workers_device() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: GPU memory metrics need one")
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda:0")
    samples = parse(generate_latest(WorkerMetrics("cuda:0").registry).decode())
    device = {"device": "cuda:0"}
    allocated = value(samples, "dvreward_worker_gpu_memory_allocated_bytes", **device)
    assert allocated >= block.numel()
    assert value(samples, "dvreward_worker_gpu_memory_reserved_bytes", **device) >= allocated
    used = value(samples, "dvreward_worker_gpu_memory_used_bytes", **device)
    assert allocated <= used < value(samples, "dvreward_worker_gpu_memory_total_bytes", **device)
