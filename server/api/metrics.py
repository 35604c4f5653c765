"""Prometheus metrics of the API process, and the queue's gauges read at scrape time."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.errors import ServiceError
from server.queue.base import Broker

QUEUE_STATS_TIMEOUT_S = 1.0  # a scrape must not hang on a frozen Redis; the gauges are left out instead


class Metrics:
    """Per-app registry, so several apps in one process (tests) never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("dvreward_requests_total", "HTTP requests", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("dvreward_request_seconds", "request latency", ["route"], registry=self.registry,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.images = Counter("dvreward_images_total", "images scored or verified", ["outcome"],
                              registry=self.registry)
        self.warnings = Counter("dvreward_warnings_total", "warnings in /v1/score responses", ["code"],
                                registry=self.registry)
        self.p_source = Counter("dvreward_p_source_total", "verifier answers by how p was read (responses with "
                                "details)", ["source"], registry=self.registry)
        self.cache = Counter("dvreward_decomposition_cache_total", "decomposition cache lookups", ["result"],
                             registry=self.registry)


async def queue_exposition(broker: Broker) -> bytes:
    """The queue's length, pending entries and lag per stream, read from the broker now (an HPA scales workers
    on them through a Prometheus adapter). A queue that does not answer is `dvreward_queue_up 0` and no
    gauges, never stale or zero ones; an unknown lag is left out alone."""
    registry = CollectorRegistry()
    up = Gauge("dvreward_queue_up", "1 when the queue answered this scrape, else 0", registry=registry)
    try:
        async with asyncio.timeout(QUEUE_STATS_TIMEOUT_S):
            stats = await broker.queue_stats()
    except (ServiceError, TimeoutError):
        up.set(0)
        return generate_latest(registry)
    up.set(1)
    length = Gauge("dvreward_queue_length", "tasks queued or being worked on (Redis: XLEN)", ["stream"],
                   registry=registry)
    pending = Gauge("dvreward_queue_pending", "tasks claimed by a worker and not completed (the group's "
                    "pending entries)", ["stream"], registry=registry)
    lag = Gauge("dvreward_queue_lag", "tasks not yet delivered to any worker (the consumer group's lag; left "
                "out while Redis cannot count it)", ["stream"], registry=registry)
    for kind, s in stats.items():
        length.labels(kind.value).set(s.length)
        pending.labels(kind.value).set(s.pending)
        if s.lag is not None:
            lag.labels(kind.value).set(s.lag)
    return generate_latest(registry)
