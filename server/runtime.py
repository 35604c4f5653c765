"""Assembling the service from Settings: broker, engines, service, worker, app.

Kept apart from the CLI so tests and benchmarks build exactly what `dvreward serve|api|worker` run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import TYPE_CHECKING

from server.engines.loading import public_id, public_name
from server.engines.prompts import template_version
from server.queue.base import Broker, ServiceJobs, WorkerJobs
from server.service import ScoringService, ServiceConfig
from server.settings import Settings, decomposer_limits
from server.worker import Worker, WorkerHung
from server.worker_metrics import WorkerMetrics

if TYPE_CHECKING:
    from fastapi import FastAPI

    from server.api.app import Died
    from server.engines.base import Decomposer, Verifier
    from server.engines.remote.client import RemoteOptions
    from server.engines.vllm.common import VLLMOptions

log = logging.getLogger("dvreward")


def build_broker(settings: Settings, consumer: str | None = None) -> Broker:
    """The queue Settings ask for; `consumer` names a Redis client in its consumer group (fresh if None)."""
    if not settings.redis_url:
        from server.queue.memory import MemoryBroker

        return MemoryBroker(max_queue=settings.max_queue, result_ttl=settings.result_ttl_s,
                            cache_max_bytes=settings.cache_max_bytes)
    from server.queue.redis_broker import TRIM_GRACE_S, RedisBroker

    return RedisBroker(
        settings.redis_url, prefix=settings.queue_prefix, max_queue=settings.max_queue,
        result_ttl=settings.result_ttl_s, visibility_timeout=settings.visibility_timeout_s,
        max_deliveries=settings.max_deliveries, timeout=settings.redis_timeout_s,
        max_task_age=settings.request_timeout_s + TRIM_GRACE_S, lock_ttl=settings.lock_ttl_s,
        max_connections=settings.redis_max_connections, consumer=consumer,
    )


def load_engines(settings: Settings, metrics: WorkerMetrics) -> tuple[Verifier, Decomposer | None]:
    """A worker's engines, each one's loading timed into `metrics`."""
    with metrics.loading("verifier"):
        verifier = load_verifier(settings)
    if not settings.decomposer:
        return verifier, None
    with metrics.loading("decomposer"):
        return verifier, load_decomposer(settings)


def load_verifier(settings: Settings) -> Verifier:
    log.info("loading verifier %s (%s engine)", settings.verifier, settings.verifier_engine)
    if settings.verifier_engine == "vllm":
        from server.engines.vllm.verifier import VLLMVerifier

        return VLLMVerifier.load(settings.verifier, system_prompt=settings.verifier_system_prompt,
                                 options=vllm_options(settings), min_pixels=settings.min_pixels,
                                 max_pixels=settings.max_pixels)
    if settings.verifier_engine == "openai":
        from server.engines.remote.verifier import OpenAIVerifier

        assert settings.verifier_url is not None  # checked by Settings
        return OpenAIVerifier.connect(
            settings.verifier_url, settings.verifier, settings.verifier_system_prompt,
            remote_options(settings, settings.verifier_api_key), tokenizer=settings.verifier_tokenizer,
            exact=settings.verifier_exact_logprobs, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels,
        )
    from server.engines.hf.verifier import HFVerifier

    log.info("verifier on %s (%s)", settings.device, settings.dtype)
    return HFVerifier.load(
        settings.verifier, device=settings.device, dtype=settings.dtype, min_pixels=settings.min_pixels,
        max_pixels=settings.max_pixels, mode=settings.verifier_mode, max_batch_tokens=settings.max_batch_tokens,
        batched_vision=settings.batched_vision, system_prompt=settings.verifier_system_prompt,
    )


def load_decomposer(settings: Settings) -> Decomposer | None:
    if not settings.decomposer:
        return None
    limits = decomposer_limits(settings)
    log.info("loading decomposer %s (%s pipeline, %s engine)", settings.decomposer, settings.pipeline,
             settings.decomposer_engine)
    if settings.decomposer_engine == "vllm":
        from server.engines.vllm.decomposer import VLLMDecomposer

        return VLLMDecomposer(settings.decomposer, settings.pipeline, options=vllm_options(settings),
                              max_new_tokens=settings.decomposer_max_new_tokens, limits=limits)
    if settings.decomposer_engine == "openai":
        from server.engines.remote.decomposer import OpenAIDecomposer

        assert settings.decomposer_url is not None  # checked by Settings
        return OpenAIDecomposer(settings.decomposer_url, settings.decomposer, settings.pipeline,
                                options=remote_options(settings, settings.decomposer_api_key),
                                max_new_tokens=settings.decomposer_max_new_tokens, limits=limits)
    from server.engines.hf.decomposer import HFDecomposer

    return HFDecomposer(settings.decomposer, settings.pipeline, device=settings.device, dtype=settings.dtype,
                        max_new_tokens=settings.decomposer_max_new_tokens, limits=limits)


def vllm_options(settings: Settings) -> VLLMOptions:
    from server.engines.vllm.common import VLLMOptions

    return VLLMOptions(dtype=settings.dtype, tensor_parallel_size=settings.vllm_tensor_parallel_size,
                       gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
                       max_model_len=settings.vllm_max_model_len)


def remote_options(settings: Settings, api_key: str | None) -> RemoteOptions:
    from server.engines.remote.client import RemoteOptions

    return RemoteOptions(api_key=api_key, concurrency=settings.remote_concurrency,
                         timeout_s=settings.remote_timeout_s, retries=settings.remote_retries)


def build_service(settings: Settings, jobs: ServiceJobs) -> ScoringService:
    return ScoringService(jobs, ServiceConfig(
        verifier=public_name(settings.verifier, settings.public_verifier),
        decomposer=settings.decomposer or None, pipeline=settings.pipeline,
        template_version=template_version(settings.verifier_system_prompt),
        decomposer_templates=template_version(), decomposer_engine=settings.decomposer_engine,
        decomposer_max_new_tokens=settings.decomposer_max_new_tokens,
        decomposer_caps=(settings.decomposer_max_semantic, settings.decomposer_max_quality),
        verifier_system_prompt=settings.verifier_system_prompt,
        request_timeout_s=settings.request_timeout_s, cache_ttl_s=settings.cache_ttl_s,
        result_ttl_s=settings.result_ttl_s, worker_grace_s=settings.worker_grace_s,
    ))


def build_worker(settings: Settings, jobs: WorkerJobs, verifier: Verifier | None,
                 decomposer: Decomposer | None, metrics: WorkerMetrics | None = None) -> Worker:
    """Results name the models publicly (name and checkpoint digest); their paths only go to the log."""
    ids = (public_id(settings.verifier, settings.public_verifier) if verifier else None,
           public_id(settings.decomposer, settings.public_decomposer) if decomposer and settings.decomposer else None)
    log.info("worker models: verifier %s = %s, decomposer %s = %s", settings.verifier, ids[0], settings.decomposer,
             ids[1])
    return Worker(
        jobs, verifier, decomposer, template_version=template_version(settings.verifier_system_prompt),
        batch_size=settings.batch_size,
        batch_wait=settings.batch_wait_ms / 1000, heartbeat_s=settings.heartbeat_s,
        batch_timeout_s=settings.batch_timeout_s,
        max_image_pixels=settings.max_image_pixels, public_ids=ids, metrics=metrics,
    )


def worker_port(worker: Worker, settings: Settings) -> AbstractAsyncContextManager[None]:
    """The worker's /metrics and /readyz on its own port (DVREWARD_WORKER_METRICS_PORT; 0: none)."""
    from server.worker_http import serving, worker_app

    return serving(worker_app(worker.metrics, worker.readiness), settings.host, settings.worker_metrics_port)


def running(worker: Worker, on_death: Died | None = None,
            settings: Settings | None = None) -> AbstractAsyncContextManager[None]:
    """Runs the worker (and its metrics port, given settings) for the duration of the block, then drains it. A worker
    that ends before it is told to (a hung engine, a loop that crashed) is reported to `on_death` as it ends: nothing
    serves the queue any more (without `on_death`, its error is raised when the block ends)."""

    @asynccontextmanager
    async def ctx() -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop), name="dvreward-worker")
        died: list[BaseException] = []

        def ended(t: asyncio.Task[None]) -> None:
            if stop.is_set() or on_death is None:
                return
            died.append(RuntimeError("it was cancelled") if t.cancelled()
                        else t.exception() or RuntimeError("it returned without being told to stop"))
            on_death(died[0])

        task.add_done_callback(ended)
        try:
            async with worker_port(worker, settings) if settings else nullcontext():
                yield
        finally:
            stop.set()
            if not died:  # a death was reported when it happened
                await task

    return ctx()


def worker_hung(exc: BaseException) -> bool:
    """Whether a worker died of a hung engine: its thread can be neither stopped nor joined, only left by os._exit."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(WorkerHung) is not None
    return isinstance(exc, WorkerHung)


def build_app(settings: Settings, worker_engines: tuple[Verifier | None, Decomposer | None] | None,
              worker_metrics: WorkerMetrics | None = None, on_worker_death: Died | None = None) -> FastAPI:
    """The API; with engines it also runs a worker in-process (the embedded default). If that worker dies, the app
    says so (/healthz and /readyz answer 503) and `on_worker_death` decides what the process does (`dvreward serve`
    exits non-zero, for its supervisor to restart it)."""
    from server.api.app import create_app

    broker = build_broker(settings)
    service = build_service(settings, broker)
    if worker_engines is None:
        return create_app(settings, broker, service)
    worker = build_worker(settings, broker, *worker_engines, metrics=worker_metrics)
    return create_app(settings, broker, service, background=lambda died: running(worker, died, settings),
                      on_background_death=on_worker_death)
