"""The broker interface both queue implementations satisfy (and the contract tests check), one protocol per job."""

from __future__ import annotations

import asyncio
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
    """The API's side of the work: tasks in."""

    async def submit(self, tasks: Sequence[Task]) -> None:
        """Enqueue all or nothing, in one atomic step: ServiceError(rate_limited) when the queue is full,
        ServiceError(too_large) when the tasks could never fit."""
        ...


class Replies(Protocol):
    """The API's side of the results: a request gathers its tasks' results."""

    async def gather(self, reply_to: str, task_ids: set[str], deadline: float) -> dict[str, Result]:
        """Wait (blocking, no polling) until every task has a result, or raise ServiceError(timeout)."""
        ...


class WorkQueue(Protocol):
    """A worker's side of the work: claim a batch, keep it claimed, complete it; one round trip each."""

    async def claim(self, kind: TaskKind, max_n: int, max_wait: float) -> list[Task]: ...

    async def extend(self, tasks: Sequence[Task]) -> None:
        """Keep claimed tasks from being re-delivered while they are still being worked on."""
        ...

    async def complete(self, done: Sequence[tuple[Task, Result]]) -> None:
        """Deliver each result, at most once per task id however often its task was delivered, and acknowledge the
        tasks; all of them or (on an error) none."""
        ...


class Lease(Protocol):
    """The right to compute one value that other callers wait for. Entered while computing (it is kept alive);
    leaving it without `publish` tells every waiter that the computation failed, with the error raised (or
    ServiceError(unavailable) for a cancellation)."""

    async def __aenter__(self) -> Lease: ...

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None: ...

    async def publish(self, value: bytes, ttl: float) -> None:
        """Keep the value for `ttl` seconds and hand it to every waiter."""
        ...


class OnceStore(Protocol):
    """Values computed once however many callers ask for them at the same time (decompositions, idempotent
    responses)."""

    async def join(self, key: str, deadline: float) -> bytes | Lease:
        """The kept value of `key`, or this caller's lease to compute it, decided in one atomic step; a caller that
        finds it being computed waits for that value until the deadline (ServiceError(timeout)), gets that
        computation's error, or takes the lease over from an owner that died."""
        ...


class WorkerRegistry(Protocol):
    """Live workers and the models they serve (what /readyz and /v1/models report)."""

    async def heartbeat(self, info: WorkerInfo, ttl: float) -> None: ...

    async def remove_worker(self, worker_id: str) -> None: ...

    async def workers(self) -> list[WorkerInfo]: ...


class QueueMonitor(Protocol):
    """What probes and autoscalers read."""

    async def ping(self) -> None:
        """Raise ServiceError(unavailable) when the backend cannot be reached."""
        ...

    async def queue_depth(self, kind: TaskKind) -> int:
        """Tasks counted against the queue bound: queued, or claimed and not yet completed."""
        ...

    async def queue_stats(self) -> dict[TaskKind, QueueStats]:
        """Every kind's queue, read now (for /metrics and autoscaling)."""
        ...


class ServiceJobs(TaskQueue, Replies, OnceStore, WorkerRegistry, Protocol):
    """What the scoring service uses: tasks in, results back, decompositions once, which workers live."""


class WorkerJobs(WorkQueue, WorkerRegistry, Protocol):
    """What a worker uses: its batches, and its entry in the registry."""


class Broker(TaskQueue, Replies, WorkQueue, OnceStore, WorkerRegistry, QueueMonitor, Protocol):
    """Every job over one backend (in-process or Redis), which both implementations satisfy."""

    async def close(self) -> None: ...


async def singleflight(store: OnceStore, key: str, compute: Compute, ttl: float, deadline: float) -> tuple[bytes, bool]:
    """(value, was_kept): the value of `key`, computed by one caller however many ask at once. A failed computation
    is not kept; its error reaches every waiter."""
    got = await store.join(key, deadline)
    if isinstance(got, bytes):
        return got, True
    async with got:
        value = await compute()
        await got.publish(value, ttl)
    return value, False


def too_many(kind: TaskKind, n: int, max_queue: int) -> None:
    """More tasks than the whole queue holds can never be admitted: 413 (split the request), not 429."""
    if n > max_queue:
        raise ServiceError(ErrorCode.too_large, f"the request needs {n} {kind.value} tasks and the queue holds at "
                           f"most {max_queue} (DVREWARD_MAX_QUEUE): send it in smaller requests")


def queue_full(kind: TaskKind, depth: int, max_queue: int) -> ServiceError:
    return ServiceError(ErrorCode.rate_limited,
                        f"the {kind.value} queue holds {depth} tasks and takes at most {max_queue}; retry later",
                        retry_after=1.0)


def lease_error(exc: BaseException | None) -> ServiceError:
    """What the waiters of a computation that ended without a value hear."""
    if isinstance(exc, ServiceError):
        return exc
    if exc is None or isinstance(exc, asyncio.CancelledError):
        return ServiceError(ErrorCode.unavailable, "the identical computation was cancelled", retry_after=1.0)
    return ServiceError(ErrorCode.internal, f"{exc}")


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
