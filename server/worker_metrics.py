"""Prometheus metrics of one worker process: what its engines did, how long they took to load, its GPU's memory.

Every worker process has a registry and a port of its own (DVREWARD_WORKER_METRICS_PORT; `worker --devices`
gives its i-th process that port + i), so Prometheus sees each GPU's worker apart from the others.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from server.queue.messages import Result, Task, TaskKind, Verified

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class WorkerMetrics:
    def __init__(self, device: str = "cpu") -> None:
        """`device` is the worker's torch device, whose memory is reported when it is a GPU."""
        r = self.registry = CollectorRegistry()
        self.info = Gauge("dvreward_worker_info", "this worker's id and public model names (always 1)",
                          ["worker_id", "verifier", "decomposer"], registry=r)
        self.batches = Counter("dvreward_worker_batches_total", "engine batches run", ["kind"], registry=r)
        self.batch_size = Histogram("dvreward_worker_batch_size", "tasks in one engine batch", ["kind"],
                                    buckets=BATCH_SIZES, registry=r)
        self.batch_seconds = Histogram("dvreward_worker_batch_seconds", "wall time of one engine batch, image "
                                       "decoding included", ["kind"], buckets=BATCH_SECONDS, registry=r)
        self.images = Counter("dvreward_worker_images_total", "images of the items verified", registry=r)
        self.questions = Counter("dvreward_worker_questions_total", "questions answered (one p each)", registry=r)
        self.failures = Counter("dvreward_worker_failures_total", "tasks this worker failed, by error code",
                                ["code"], registry=r)
        self.p_source = Counter("dvreward_worker_p_source_total", "p values by how they were read", ["source"],
                                registry=r)
        self.load_seconds = Gauge("dvreward_worker_engine_load_seconds", "time loading the role's engine took",
                                  ["role"], registry=r)
        r.register(GpuMemory(device))

    @contextmanager
    def loading(self, role: str) -> Iterator[None]:
        """Time the block as the loading of `role`'s engine (set only once it loaded)."""
        start = time.perf_counter()
        yield
        self.load_seconds.labels(role).set(time.perf_counter() - start)

    def batch(self, kind: TaskKind, size: int, seconds: float) -> None:
        self.batches.labels(kind.value).inc()
        self.batch_size.labels(kind.value).observe(size)
        self.batch_seconds.labels(kind.value).observe(seconds)

    def outcome(self, task: Task, result: Result) -> None:
        """Count a task's result: its error code, or what a verification answered."""
        if result.error is not None:
            self.failures.labels(result.error.code.value).inc()
        elif isinstance(result.value, Verified):
            self.images.inc(len(task.blobs))
            self.questions.inc(len(result.value.p))
            for source in result.value.p_source:
                self.p_source.labels(source).inc()


class GpuMemory:
    """The worker's GPU memory, read at scrape time. Nothing at all while this process has not initialised
    CUDA (a CPU worker, a remote engine, models still loading): no metric rather than a made-up 0."""

    def __init__(self, device: str) -> None:
        self.device = device

    def collect(self) -> Iterator[Metric]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return
        index = int(self.device[5:]) if self.device.startswith("cuda:") else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        label = [f"cuda:{index}"]
        for name, help_text, value in (
            ("allocated", "bytes of tensors this process holds", torch.cuda.memory_allocated(index)),
            ("reserved", "bytes this process's caching allocator holds", torch.cuda.memory_reserved(index)),
            ("used", "bytes in use on the device by every process (its engine processes too)", total - free),
            ("total", "bytes of device memory", total),
        ):
            family = GaugeMetricFamily(f"dvreward_worker_gpu_memory_{name}_bytes", f"GPU memory: {help_text}",
                                       labels=["device"])
            family.add_metric(label, value)
            yield family
