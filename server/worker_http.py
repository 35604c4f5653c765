"""A worker's own HTTP port: Prometheus `/metrics` and `/readyz` (Kubernetes' readiness probe).

It runs in the worker's event loop, so it answers only while the loop does, and it opens once the models
are loaded (a probe before that finds the port closed: not ready).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, nullcontext

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.worker_metrics import WorkerMetrics

log = logging.getLogger("dvreward.worker")

def worker_app(metrics: WorkerMetrics, readiness: Callable[[], str | None]) -> Starlette:
    """`readiness` returns why the worker cannot take tasks, or None when it can."""

    async def scrape(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def readyz(_: Request) -> Response:
        reason = readiness()
        if reason is None:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    return Starlette(routes=[Route("/metrics", scrape), Route("/readyz", readyz)])


class _Config(uvicorn.Config):
    """Leaves logging to the command: configuring it here would reset the API's uvicorn loggers in `serve`."""

    def configure_logging(self) -> None:
        return None


class _InLoop(uvicorn.Server):
    """uvicorn inside the worker's loop: SIGTERM is the worker's (it drains), so uvicorn takes no signals."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serving(app: Starlette, host: str, port: int) -> AbstractAsyncContextManager[None]:
    """Serve `app` on host:port for the duration of the block; port 0 serves nothing."""
    if port == 0:
        return nullcontext()

    @asynccontextmanager
    async def ctx() -> AsyncIterator[None]:
        server = _InLoop(_Config(app, host=host, port=port, lifespan="off"))
        task = asyncio.create_task(server.serve(), name="dvreward-worker-metrics")
        log.info("worker /metrics and /readyz on http://%s:%d", host, port)
        try:
            yield
        finally:
            server.should_exit = True
            await task

    return ctx()
