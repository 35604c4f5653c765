"""The in-process broker of the embedded default: same contract as Redis, no server needed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from dvreward_protocol.schemas import WorkerInfo
from server.queue.base import Lease, QueueStats, lease_error, queue_full, too_many, wait_until
from server.queue.messages import Result, Task, TaskKind

ENTRY_BYTES = 200  # what a cached entry costs beyond its key and value (dict slot, tuple, objects), roughly


class MemoryBroker:
    def __init__(self, *, max_queue: int, result_ttl: float, cache_max_bytes: int) -> None:
        """Values come from Settings (`runtime.build_broker`); `cache_max_bytes` bounds the single-flight cache
        (decompositions and idempotency records)."""
        self.max_queue = max_queue
        self._inserts = 0
        self.result_ttl = result_ttl
        self.cache_max_bytes = cache_max_bytes
        self._cached_bytes = 0
        self._queues: dict[TaskKind, asyncio.Queue[Task]] = {k: asyncio.Queue() for k in TaskKind}
        self._claimed: dict[TaskKind, set[str]] = {k: set() for k in TaskKind}  # counted until completed
        self._replies: dict[str, asyncio.Queue[Result]] = {}
        self._done: dict[str, float] = {}  # task id -> expiry, for idempotent completion
        self._values: dict[str, tuple[bytes, float]] = {}  # single-flight cache: value, expiry
        self._inflight: dict[str, asyncio.Future[bytes]] = {}
        self._workers: dict[str, tuple[WorkerInfo, float]] = {}

    # ---- API side -----------------------------------------------------------------------
    async def submit(self, tasks: Sequence[Task]) -> None:
        """Atomic by construction: nothing awaits between the check and the enqueue."""
        for kind in TaskKind:
            n = sum(1 for t in tasks if t.kind is kind)
            too_many(kind, n, self.max_queue)
            depth = self._depth(kind)
            if n and depth + n > self.max_queue:
                raise queue_full(kind, depth, self.max_queue)
        for t in tasks:
            self._replies.setdefault(t.reply_to, asyncio.Queue())
            self._queues[t.kind].put_nowait(t)

    async def gather(self, reply_to: str, task_ids: set[str], deadline: float) -> dict[str, Result]:
        q = self._replies.setdefault(reply_to, asyncio.Queue())
        out: dict[str, Result] = {}
        try:
            while len(out) < len(task_ids):
                r = await wait_until(deadline, q.get(), f"{len(task_ids) - len(out)} of {len(task_ids)} tasks")
                if r.task_id in task_ids:
                    out[r.task_id] = r
        finally:
            self._replies.pop(reply_to, None)
        return out

    async def join(self, key: str, deadline: float) -> bytes | Lease:
        """Atomic by construction: nothing awaits between the look-ups and taking the lease."""
        hit = self._values.get(key)
        if hit and hit[1] > time.time():
            return hit[0]
        fut = self._inflight.get(key)
        if fut is not None:
            return await wait_until(deadline, asyncio.shield(fut), "a concurrent identical computation")
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even with no waiter
        self._inflight[key] = fut
        return _MemoryLease(self, key, fut)

    def _remember(self, key: str, value: bytes, ttl: float) -> None:
        """Bounded by bytes, as the values' sizes vary by orders of magnitude: expired entries are swept regularly,
        the oldest go when the budget is spent, and a value larger than the whole budget is not kept."""
        size = _entry_bytes(key, value)
        if size > self.cache_max_bytes:
            return
        self._forget(key)
        now = time.time()
        self._inserts += 1
        if self._inserts % 256 == 0 or self._cached_bytes + size > self.cache_max_bytes:
            for k in [k for k, (_, expiry) in self._values.items() if expiry <= now]:
                self._forget(k)
        while self._cached_bytes + size > self.cache_max_bytes:
            self._forget(next(iter(self._values)))
        self._values[key] = (value, now + ttl)
        self._cached_bytes += size

    def _forget(self, key: str) -> None:
        old = self._values.pop(key, None)
        if old is not None:
            self._cached_bytes -= _entry_bytes(key, old[0])

    # ---- worker side ----------------------------------------------------------------------
    async def claim(self, kind: TaskKind, max_n: int, max_wait: float) -> list[Task]:
        q = self._queues[kind]
        out: list[Task] = []
        if q.empty():
            try:
                out.append(await asyncio.wait_for(q.get(), timeout=max_wait))
            except TimeoutError:
                return out
        while len(out) < max_n and not q.empty():
            out.append(q.get_nowait())
        self._claimed[kind].update(t.task_id for t in out)
        return out

    async def complete(self, done: Sequence[tuple[Task, Result]]) -> None:
        now = time.time()
        if len(self._done) > 100_000:  # bounded: forget deliveries older than the result TTL
            self._done = {k: v for k, v in self._done.items() if v > now}
        for task, result in done:
            self._claimed[task.kind].discard(task.task_id)
            if self._done.get(task.task_id, 0) > now:
                continue
            self._done[task.task_id] = now + self.result_ttl
            q = self._replies.get(task.reply_to)
            if q is not None:  # nobody waits any more when the request has finished or timed out
                q.put_nowait(result)

    async def extend(self, tasks: Sequence[Task]) -> None:
        return None  # in-process tasks are never re-delivered: a crash takes the whole process

    async def heartbeat(self, info: WorkerInfo, ttl: float) -> None:
        self._workers[info.worker_id] = (info, time.time() + ttl)

    async def remove_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    async def workers(self) -> list[WorkerInfo]:
        now = time.time()
        return [info for info, exp in self._workers.values() if exp > now]

    async def ping(self) -> None:
        return None

    async def queue_depth(self, kind: TaskKind) -> int:
        return self._depth(kind)

    def _depth(self, kind: TaskKind) -> int:
        return self._queues[kind].qsize() + len(self._claimed[kind])

    async def queue_stats(self) -> dict[TaskKind, QueueStats]:
        """The same three numbers Redis gives: waiting tasks are the lag, claimed ones are pending."""
        return {k: QueueStats(length=self._depth(k), pending=len(self._claimed[k]), lag=self._queues[k].qsize())
                for k in TaskKind}

    async def close(self) -> None:
        return None


class _MemoryLease:
    def __init__(self, broker: MemoryBroker, key: str, fut: asyncio.Future[bytes]) -> None:
        self.broker, self.key, self.fut = broker, key, fut

    async def __aenter__(self) -> _MemoryLease:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.broker._inflight.pop(self.key, None)
        if not self.fut.done():  # failed or cancelled: the waiters must not hang
            self.fut.set_exception(lease_error(exc))

    async def publish(self, value: bytes, ttl: float) -> None:
        self.broker._remember(self.key, value, ttl)
        self.broker._inflight.pop(self.key, None)
        self.fut.set_result(value)


def _entry_bytes(key: str, value: bytes) -> int:
    return len(key) + len(value) + ENTRY_BYTES
