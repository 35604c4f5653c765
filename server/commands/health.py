"""`dvreward worker-health`: the worker image's HEALTHCHECK. A worker has no port to probe; it is healthy while a
worker process of this host is in the registry that /readyz reads, its heartbeat live."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

from server.commands.service import settings_from
from server.errors import ServiceError
from server.preflight import StartupError


def _worker_health(args: argparse.Namespace) -> int:
    from server.runtime import build_broker
    from server.worker import runs_on

    s = settings_from(args)
    if not s.redis_url:
        raise StartupError(["the worker registry is in Redis: set DVREWARD_REDIS_URL"])

    async def registered() -> list[str]:
        broker = build_broker(s)
        try:
            return [w.worker_id for w in await broker.workers()]
        finally:
            await broker.close()

    host = socket.gethostname()
    try:
        ids = asyncio.run(registered())
    except ServiceError as exc:
        print(f"unhealthy: {exc.message}", file=sys.stderr)
        return 1
    mine = [i for i in ids if runs_on(i, host)]
    if not mine:
        print(f"unhealthy: no worker of host {host} has a live heartbeat ({len(ids)} of other hosts do)",
              file=sys.stderr)
        return 1
    print(f"healthy: {', '.join(sorted(mine))}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker-health", help="exit 0 if a worker of this host has a live heartbeat in Redis "
                       "(the worker image's HEALTHCHECK; reads DVREWARD_REDIS_URL and DVREWARD_QUEUE_PREFIX)")
    p.set_defaults(func=_worker_health)
