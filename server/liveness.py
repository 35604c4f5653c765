"""Whether some live worker can do a kind of task, so a request fails fast with 503 instead of waiting out its
deadline for a worker that is not there: at admission, and while its tasks wait in the queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from dvreward_protocol.schemas import WorkerInfo
from server.errors import ErrorCode, ServiceError
from server.queue.base import WorkerRegistry
from server.queue.messages import TaskKind

T = TypeVar("T")
REGISTRY_CACHE_S = 0.5  # one registry read serves every request of this half second
ROLE = {TaskKind.verify: "verifier", TaskKind.decompose: "decomposer"}


def serves(worker: WorkerInfo, kind: TaskKind) -> bool:
    return bool(worker.verifier) if kind is TaskKind.verify else worker.decomposer is not None


class WorkerWatch:
    """When a worker that can do each kind of task was last seen; none for longer than `grace_s` is a 503.

    The grace counts from this process's start too, so an API started beside loading workers waits for them
    that long before it refuses (clients retry a 503 with backoff).
    """

    def __init__(self, registry: WorkerRegistry, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry, self.grace_s, self.clock = registry, grace_s, clock
        self.last_seen = {kind: clock() for kind in TaskKind}
        self._read: tuple[float, list[WorkerInfo]] | None = None

    async def require(self, kind: TaskKind) -> None:
        """Raise ServiceError(unavailable) when no live worker has done `kind` for longer than the grace."""
        now = self.clock()
        if self._read is None or now - self._read[0] > REGISTRY_CACHE_S:
            self._read = (now, await self.registry.workers())
        if any(serves(w, kind) for w in self._read[1]):
            self.last_seen[kind] = now
            return
        gone = now - self.last_seen[kind]
        if gone > self.grace_s:
            raise ServiceError(ErrorCode.unavailable, f"no live worker with a {ROLE[kind]} for {gone:.0f} s "
                               f"(DVREWARD_WORKER_GRACE_S is {self.grace_s:g}): start `dvreward worker` or wait for "
                               "one to finish loading its models", retry_after=min(self.grace_s, 5.0))

    async def waiting(self, kind: TaskKind, result: Awaitable[T]) -> T:
        """`result` (a gather of queued tasks), unless the workers that could do them are gone for the grace."""
        task = asyncio.ensure_future(result)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=min(1.0, self.grace_s / 2))
                if done:
                    return task.result()
                await self.require(kind)
        finally:
            # Returned, or given up (no worker, or cancelled): a gather still running is abandoned, not awaited (a
            # client library may finish its blocking read first), and its outcome no longer matters.
            task.cancel()
            task.add_done_callback(_outcome_read)


def _outcome_read(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned wait's outcome as read (an asyncio 'never retrieved' warning is not a bug here)."""
    if not task.cancelled():
        task.exception()
