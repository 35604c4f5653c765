"""Assembling the service from Settings: broker, engines, service, worker, app.

Kept apart from the CLI so tests and benchmarks build exactly what `dvreward serve|api|worker` run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

from server.engines.prompts import template_version
from server.queue.base import Broker
from server.service import ScoringService, ServiceConfig
from server.settings import Settings
from server.worker import Worker

if TYPE_CHECKING:
    from fastapi import FastAPI

    from server.engines.base import Decomposer, Verifier

log = logging.getLogger("dvreward")


def build_broker(settings: Settings) -> Broker:
    if not settings.redis_url:
        from server.queue.memory import MemoryBroker

        return MemoryBroker(max_queue=settings.max_queue, result_ttl=settings.result_ttl_s)
    from server.queue.redis_broker import RedisBroker

    return RedisBroker(
        settings.redis_url, prefix=settings.queue_prefix, max_queue=settings.max_queue,
        result_ttl=settings.result_ttl_s, visibility_timeout=settings.visibility_timeout_s,
        max_deliveries=settings.max_deliveries,
    )


def load_verifier(settings: Settings) -> Verifier:
    from server.engines.hf_verifier import HFVerifier

    log.info("loading verifier %s on %s (%s)", settings.verifier, settings.device, settings.dtype)
    return HFVerifier.load(
        settings.verifier, device=settings.device, dtype=settings.dtype, min_pixels=settings.min_pixels,
        max_pixels=settings.max_pixels, mode=settings.verifier_mode, max_batch_tokens=settings.max_batch_tokens,
        batched_vision=settings.batched_vision, system_prompt=settings.verifier_system_prompt,
    )


def load_decomposer(settings: Settings) -> Decomposer | None:
    if not settings.decomposer:
        return None
    from server.engines.decomposition_schema import Limits
    from server.engines.hf_decomposer import HFDecomposer

    log.info("loading decomposer %s (%s pipeline)", settings.decomposer, settings.pipeline)
    return HFDecomposer(settings.decomposer, settings.pipeline, device=settings.device, dtype=settings.dtype,
                        max_new_tokens=settings.decomposer_max_new_tokens,
                        limits=Limits(max_semantic=settings.decomposer_max_semantic,
                                      max_quality=settings.decomposer_max_quality))


def build_service(settings: Settings, broker: Broker) -> ScoringService:
    return ScoringService(broker, ServiceConfig(
        verifier=settings.verifier, decomposer=settings.decomposer or None, pipeline=settings.pipeline,
        template_version=template_version(settings.verifier_system_prompt),
        verifier_system_prompt=settings.verifier_system_prompt,
        request_timeout_s=settings.request_timeout_s, cache_ttl_s=settings.cache_ttl_s,
        result_ttl_s=settings.result_ttl_s,
    ))


def build_worker(settings: Settings, broker: Broker, verifier: Verifier | None,
                 decomposer: Decomposer | None) -> Worker:
    return Worker(
        broker, verifier, decomposer, template_version=template_version(settings.verifier_system_prompt),
        batch_size=settings.batch_size,
        batch_wait=settings.batch_wait_ms / 1000, heartbeat_s=settings.heartbeat_s,
        max_image_pixels=settings.max_image_pixels,
    )


def running(worker: Worker) -> AbstractAsyncContextManager[None]:
    """Runs the worker for the duration of the block, then drains it."""

    @asynccontextmanager
    async def ctx() -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop), name="dvreward-worker")
        try:
            yield
        finally:
            stop.set()
            await task

    return ctx()


def build_app(settings: Settings, worker_engines: tuple[Verifier | None, Decomposer | None] | None) -> FastAPI:
    """The API; with engines it also runs a worker in-process (the embedded default)."""
    from server.api.app import create_app

    broker = build_broker(settings)
    service = build_service(settings, broker)
    if worker_engines is None:
        return create_app(settings, service)
    worker = build_worker(settings, broker, *worker_engines)
    return create_app(settings, service, background=lambda: running(worker))
