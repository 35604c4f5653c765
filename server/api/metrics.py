"""Prometheus metrics of the API process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


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
