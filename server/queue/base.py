"""The broker interface both queue implementations satisfy (and the contract tests check), one protocol per job."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dvreward_protocol.schemas import WorkerInfo
from server.errors import ErrorCode, ServiceError
from server.queue.messages import Result, Task, TaskKind

Compute = Callable[[], Awaitable[bytes]]


@dataclass(frozen=True)
class QueueStats:
    """One task kind's queue as an autoscaler sees it (Redis: XLEN and the consumer group's XINFO GROUPS).

    `length`: tasks queued or claimed and not yet completed (completed ones leave the stream); `pending`:
    claimed and not completed; `lag`: not yet delivered to any worker, or None where the backend cannot say
    (Redis before 7, or Redis 7 right after a newer task completed before an older one).
    """

    length: int
    pending: int
    lag: int | None


class TaskQueue(Protocol):
    """Work to do: the API submits tasks, workers claim them in batches."""

    async def submit(self, tasks: Sequence[Task]) -> None:
        """Enqueue all or nothing, in one atomic step: ServiceError(rate_limited) when the queue is full,
        ServiceError(too_large) when the tasks could never fit."""
        ...

    async def claim(self, kind: TaskKind, max_n: int, max_wait: float) -> list[Task]: ...

    async def extend(self, tasks: Sequence[Task]) -> None:
        """Keep claimed tasks from being re-delivered while they are still being worked on."""
        ...

    async def queue_depth(self, kind: TaskKind) -> int:
        """Tasks counted against the queue bound: queued, or claimed and not yet completed."""
        ...

    async def queue_stats(self) -> dict[TaskKind, QueueStats]:
        """Every kind's queue, read now (for /metrics and autoscaling)."""
        ...


class Replies(Protocol):
    """Results on their way back: a worker completes a task, the API gathers its request's results."""

    async def complete(self, task: Task, result: Result) -> None:
        """Deliver the result (idempotent on task id), then acknowledge the task."""
        ...

    async def gather(self, reply_to: str, task_ids: set[str], deadline: float) -> dict[str, Result]:
        """Wait (blocking, no polling) until every task has a result, or raise ServiceError(timeout); raise
        ServiceError(unavailable) at once if the backend lost the tasks (a flushed or restarted Redis)."""
        ...


class SingleFlight(Protocol):
    """A cache that computes each value once, however many callers ask for it concurrently."""

    async def singleflight(self, key: str, compute: Compute, ttl: float, deadline: float) -> tuple[bytes, bool]:
        """The cached value of `key`, or compute it once however many callers ask concurrently.

        Returns (value, was_cached). A failed compute is not cached; its error reaches every waiter.
        """
        ...


class WorkerRegistry(Protocol):
    """Live workers and the models they serve (what /readyz and /v1/models report)."""

    async def heartbeat(self, info: WorkerInfo, ttl: float) -> None: ...

    async def remove_worker(self, worker_id: str) -> None: ...

    async def workers(self) -> list[WorkerInfo]: ...


class Broker(TaskQueue, Replies, SingleFlight, WorkerRegistry, Protocol):
    """The four jobs over one backend (in-process or Redis), which both implementations satisfy."""

    async def ping(self) -> None:
        """Raise ServiceError(unavailable) when the backend cannot be reached."""
        ...

    async def close(self) -> None: ...


def too_many(kind: TaskKind, n: int, max_queue: int) -> None:
    """More tasks than the whole queue holds can never be admitted: 413 (split the request), not 429."""
    if n > max_queue:
        raise ServiceError(ErrorCode.too_large, f"the request needs {n} {kind.value} tasks and the queue holds at "
                           f"most {max_queue} (DVREWARD_MAX_QUEUE): send it in smaller requests")


def queue_full(kind: TaskKind, depth: int, max_queue: int) -> ServiceError:
    return ServiceError(ErrorCode.rate_limited,
                        f"the {kind.value} queue holds {depth} tasks and takes at most {max_queue}; retry later",
                        retry_after=1.0)


def singleflight_message(value: bytes | None, error: ServiceError | None) -> bytes:
    if error is not None:
        return json.dumps({"ok": False, "code": error.code.value, "message": error.message}).encode()
    assert value is not None
    return json.dumps({"ok": True, "value": value.decode()}).encode()


def singleflight_value(raw: bytes) -> bytes:
    msg = json.loads(raw)
    if not msg["ok"]:
        raise ServiceError(ErrorCode(msg["code"]), msg["message"])
    return msg["value"].encode()


async def collect_batch(
    fetch: Callable[[int, float], Awaitable[list[Any]]], max_size: int, max_wait: float,
    stop: asyncio.Event | None = None,
) -> list[Any]:
    """Fill a batch up to max_size, waiting at most max_wait once the first item has arrived, and no longer
    once `stop` is set (a steady trickle of tasks would otherwise hold a stopping worker for max_wait).

    `fetch(n, timeout)` returns up to n items, blocking up to timeout seconds for the first.
    The first call blocks for max_wait too, so an idle worker loops at that period.
    """
    batch: list[Any] = list(await fetch(max_size, max_wait))
    if not batch:
        return batch
    end = time.monotonic() + max_wait
    while len(batch) < max_size and not (stop is not None and stop.is_set()):
        left = end - time.monotonic()
        if left <= 0:
            break
        more = await fetch(max_size - len(batch), left)
        if not more:
            break
        batch.extend(more)
    return batch


def remaining(deadline: float) -> float:
    return max(0.0, deadline - time.time())


async def wait_until(deadline: float, aw: Awaitable[Any], what: str) -> Any:
    try:
        return await asyncio.wait_for(aw, timeout=remaining(deadline))
    except TimeoutError as exc:
        raise ServiceError(ErrorCode.timeout, f"{what} did not finish before the request deadline") from exc
