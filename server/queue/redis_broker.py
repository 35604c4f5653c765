"""Redis Streams broker: consumer groups, at-least-once delivery, XAUTOCLAIM of dead workers' tasks.

Results are delivered by an atomic script (mark done + push to the request's reply list) before
XACK, so a crash between the two re-delivers a task that is then acknowledged without a second
reply. Every key carries a TTL (the streams too, and they are trimmed past the tasks' deadlines,
so Redis memory is bounded by the queue limit while workers are down). Image bytes travel as raw
stream fields, never pickled. A Redis that loses its data (FLUSHALL, a restart without persistence)
costs the requests in flight a quick 503, and workers make their consumer groups again.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError, ResponseError

from dvreward_protocol.schemas import WorkerInfo
from server.errors import ErrorCode, ServiceError, validation_problems
from server.queue.base import Compute, QueueStats, queue_full, remaining, too_many
from server.queue.keys import GROUP, Keys
from server.queue.messages import Result, Task, TaskKind
from server.queue.redis_errors import RETRY_AFTER_S, error_code, unavailable
from server.queue.redis_singleflight import RedisSingleFlight

log = logging.getLogger("dvreward.queue")
P = ParamSpec("P")
T = TypeVar("T")

# Every command has a socket timeout, so a frozen Redis (SIGSTOP, a stalled disk) is a 503 within
# seconds instead of a hang. A blocking read (BLPOP) waits at most half of it per call: a wait longer
# than the socket timeout must not read as an outage.
TRIM_GRACE_S = 5.0  # clock skew between API replicas and Redis that trimming by deadline tolerates
SAME_VERSION = "the API and the workers must run the same DVReward version"  # tasks and results are theirs

# KEYS: the streams, then the requests' markers. ARGV: max queue, oldest entry id kept (ms), key ttl ms, task
# count, stream count, then per task: stream index, field count, fields. Trims entries past every deadline, then
# admits all tasks or none (returns the index and depth of a full stream), so concurrent submits can never overfill
# a queue; the markers say, while they last, that Redis still holds the requests' tasks. Declared (#!lua, Redis 7)
# so that a Redis out of memory refuses it whole: otherwise the XTRIM counts as the script's first write, and Redis
# lets a script that has written write on, past maxmemory.
_ADMIT = """#!lua
local maxq, min_id, ttl, ntasks = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local nstreams = tonumber(ARGV[5])
local counts, plan, i = {}, {}, 6
for n = 1, ntasks do
  local s, nf = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  counts[s] = (counts[s] or 0) + 1
  plan[n] = {s, i + 2, nf}
  i = i + 2 + 2 * nf
end
for s, n in pairs(counts) do
  if min_id > 0 then redis.call('XTRIM', KEYS[s], 'MINID', min_id) end
  local depth = redis.call('XLEN', KEYS[s])
  if depth + n > maxq then return {s, depth} end
end
for _, p in ipairs(plan) do
  local fields = {}
  for j = p[2], p[2] + 2 * p[3] - 1 do fields[#fields + 1] = ARGV[j] end
  redis.call('XADD', KEYS[p[1]], '*', unpack(fields))
end
for s, _ in pairs(counts) do redis.call('PEXPIRE', KEYS[s], ttl) end
for m = nstreams + 1, #KEYS do redis.call('SET', KEYS[m], '1', 'PX', ttl) end
return {0, 0}
"""

# KEYS: done, reply. ARGV: result, ttl. Delivers once per task id.
_DELIVER = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

# A blocked XREADGROUP whose stream or group was deleted (FLUSHALL, FLUSHDB) is answered UNBLOCKED; any other
# command on them, NOGROUP. Either way the group is made again.
_GROUP_LOST = ("NOGROUP", "UNBLOCKED")


def _unavailable(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """A Redis that cannot be reached, or refuses commands for now (out of memory, read-only, loading), is a 503
    with a message saying what is wrong; other Redis errors are faults and pass unchanged."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except (RedisError, OSError) as exc:
            mapped = unavailable(exc)
            if mapped is None:
                raise
            raise mapped from exc

    return wrapper


class RedisBroker:
    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        max_queue: int,
        result_ttl: int,
        visibility_timeout: float,
        max_deliveries: int,
        timeout: float,
        max_task_age: float,
        lock_ttl: float,
        consumer: str | None = None,
    ) -> None:
        """Values come from Settings (`runtime.build_broker`); `consumer` names this client in its consumer
        group (a fresh name when None). `timeout` bounds every command; tasks older than `max_task_age`
        (past any deadline) are trimmed; `lock_ttl` is how long a single-flight lock outlives its owner."""
        self.url = url
        self.redis = aioredis.Redis.from_url(url, decode_responses=False, socket_connect_timeout=timeout,
                                             socket_timeout=timeout, health_check_interval=10)
        self.block_s = timeout / 2
        self.max_age_ms = int(max_task_age * 1000)
        self.keys = Keys(prefix)
        self.max_queue = max_queue
        self.result_ttl = result_ttl
        self.visibility_ms = int(visibility_timeout * 1000)
        self.max_deliveries = max_deliveries
        self.consumer = consumer or f"c-{uuid.uuid4().hex[:12]}"
        self._admit = self.redis.register_script(_ADMIT)
        self._deliver = self.redis.register_script(_DELIVER)
        self._singleflight = RedisSingleFlight(self.redis, self.keys, lock_ttl=lock_ttl, block_s=self.block_s)
        self._groups_ready: set[TaskKind] = set()
        self._unsettled: set[TaskKind] = set()

    async def _ensure_group(self, kind: TaskKind) -> None:
        if kind in self._groups_ready:
            return
        try:
            await self.redis.xgroup_create(self.keys.stream(kind), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if error_code(exc) != "BUSYGROUP":
                raise
        self._groups_ready.add(kind)

    # ---- API side -----------------------------------------------------------------------
    @_unavailable
    async def submit(self, tasks: Sequence[Task]) -> None:
        kinds = list(dict.fromkeys(t.kind for t in tasks))
        for kind in kinds:
            too_many(kind, sum(1 for t in tasks if t.kind is kind), self.max_queue)
            await self._ensure_group(kind)
        # The cut-off is on this clock, as the tasks' deadlines are; entry ids are on Redis's (TRIM_GRACE_S of skew).
        oldest_kept = int(time.time() * 1000) - self.max_age_ms
        args: list[bytes | str | int] = [self.max_queue, oldest_kept, self.max_age_ms, len(tasks), len(kinds)]
        for t in tasks:
            fields: list[bytes | str] = ["task", t.header()]
            for i, b in enumerate(t.blobs):
                fields += [f"blob{i}", b]
            args += [kinds.index(t.kind) + 1, len(fields) // 2, *fields]
        markers = [self.keys.pending(r) for r in dict.fromkeys(t.reply_to for t in tasks)]
        full, depth = await self._admit(keys=[self.keys.stream(k) for k in kinds] + markers, args=args)
        if full:
            raise queue_full(kinds[int(full) - 1], int(depth), self.max_queue)

    @_unavailable
    async def gather(self, reply_to: str, task_ids: set[str], deadline: float) -> dict[str, Result]:
        """Between results, at every pause of the blocking read, one EXISTS of the marker `submit` wrote: gone
        before its TTL (past the deadline) means Redis lost the request's tasks (FLUSHALL, FLUSHDB, a restart
        without persistence, eviction), so no result can come and the request fails now instead of at its
        deadline. A result a worker still delivers for a lost task does not save it: the stream entry is gone."""
        reply_key, marker = self.keys.reply(reply_to), self.keys.pending(reply_to)
        out: dict[str, Result] = {}
        try:
            while len(out) < len(task_ids):
                left = remaining(deadline)
                if left <= 0:
                    raise ServiceError(
                        ErrorCode.timeout,
                        f"{len(task_ids) - len(out)} of {len(task_ids)} tasks did not finish before the deadline",
                    )
                item = await self.redis.blpop([reply_key], timeout=max(0.01, min(left, self.block_s)))
                if item is None:
                    if not await self.redis.exists(marker):
                        raise ServiceError(ErrorCode.unavailable, f"the queue (Redis) lost {len(task_ids) - len(out)}"
                                           f" of this request's {len(task_ids)} tasks (flushed or restarted); retry",
                                           retry_after=RETRY_AFTER_S)
                    continue
                r = _read_result(item[1])
                if r.task_id in task_ids:
                    out[r.task_id] = r
        finally:
            await self.redis.delete(reply_key, marker)
        return out

    @_unavailable
    async def singleflight(self, key: str, compute: Compute, ttl: float, deadline: float) -> tuple[bytes, bool]:
        return await self._singleflight.singleflight(key, compute, ttl, deadline)

    # ---- worker side ----------------------------------------------------------------------
    @_unavailable
    async def claim(self, kind: TaskKind, max_n: int, max_wait: float) -> list[Task]:
        try:
            entries = await self._read(kind, max_n, max_wait)
        except ResponseError as exc:
            if error_code(exc) not in _GROUP_LOST:
                raise
            log.warning("the %s stream's consumer group is gone (%s: Redis was flushed, or restarted without "
                        "persistence); making it again", kind.value, error_code(exc))
            self._groups_ready.discard(kind)
            entries = await self._read(kind, max_n, max_wait)
        try:
            accepted = [await self._accept(kind, eid, fields) for eid, fields in entries]
        except BaseException:
            self._unsettled.add(kind)  # claimed in Redis, never handed out: read them again next time
            raise
        return [t for t in accepted if t is not None]

    async def _read(self, kind: TaskKind, max_n: int, max_wait: float) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """This consumer's own entries that a failed claim left pending, if any; else entries idle past the
        visibility timeout (XAUTOCLAIM), then new ones (XREADGROUP). A claim that fails between reading and handing
        out (Redis refused a write) would otherwise leave its entries to wait out the visibility timeout."""
        await self._ensure_group(kind)
        stream = self.keys.stream(kind)
        if kind in self._unsettled:
            mine = await self.redis.xreadgroup(GROUP, self.consumer, {stream: "0"}, count=max_n)
            own: list[tuple[bytes, dict[bytes, bytes]]] = [e for _, items in mine or [] for e in items]
            if len(own) < max_n:
                self._unsettled.discard(kind)
            if own:
                return own
        _, entries, _ = await self.redis.xautoclaim(
            stream, GROUP, self.consumer, min_idle_time=self.visibility_ms, start_id="0-0", count=max_n
        )
        if len(entries) < max_n:
            got = await self.redis.xreadgroup(
                GROUP, self.consumer, {stream: ">"}, count=max_n - len(entries),
                block=max(1, int(min(max_wait, self.block_s) * 1000)) if not entries else None,
            )
            for _, items in got or []:
                entries.extend(items)
        return entries

    async def _accept(self, kind: TaskKind, entry_id: bytes, fields: dict[bytes, bytes] | None) -> Task | None:
        """Turn a stream entry into a task, settling duplicates and over-delivered ones on the spot."""
        stream = self.keys.stream(kind)
        if not fields or b"task" not in fields:  # deleted while pending: nothing left to do
            await self.redis.xack(stream, GROUP, entry_id)
            return None
        blobs = [fields[f"blob{i}".encode()] for i in range(len(fields) - 1)]
        try:
            task = Task.from_header(fields[b"task"], blobs, receipt=entry_id.decode())
        except ValidationError as exc:
            await self._refuse(stream, entry_id, fields[b"task"], exc)
            return None
        if await self.redis.exists(self.keys.done(task.task_id)):
            await self._ack(task)
            return None
        dkey = self.keys.deliveries(task.task_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(dkey).expire(dkey, self.result_ttl)
            task.delivery, _ = await pipe.execute()
        if task.delivery > self.max_deliveries:
            await self.complete(task, Result.failure(
                task.task_id, ErrorCode.delivery_limit,
                f"task was delivered {task.delivery - 1} times without completing (workers crashed or timed out)",
            ))
            return None
        return task

    async def _refuse(self, stream: str, entry_id: bytes, header: bytes, exc: ValidationError) -> None:
        """A task this worker cannot read (written by another DVReward version): its request hears why, and
        it leaves the stream, instead of failing every worker that claims it."""
        log.error("task %s in %s cannot be read by this worker: %s", entry_id.decode(), stream, exc)
        try:
            head = json.loads(header)
        except ValueError:
            head = None
        if isinstance(head, dict) and isinstance(head.get("task_id"), str) and isinstance(head.get("reply_to"), str):
            await self._send(head["task_id"], head["reply_to"], Result.failure(
                head["task_id"], ErrorCode.internal,
                f"a worker could not read this task ({validation_problems(exc)[0]}); {SAME_VERSION}"))
        await self._drop(stream, entry_id.decode())

    async def _ack(self, task: Task) -> None:
        assert task.receipt is not None, "a claimed task carries its stream entry id"
        await self._drop(self.keys.stream(task.kind), task.receipt)

    async def _drop(self, stream: str, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, GROUP, entry_id).xdel(stream, entry_id)
            await pipe.execute()

    async def _send(self, task_id: str, reply_to: str, result: Result) -> None:
        await self._deliver(keys=[self.keys.done(task_id), self.keys.reply(reply_to)],
                            args=[result.to_json(), self.result_ttl])

    @_unavailable
    async def complete(self, task: Task, result: Result) -> None:
        await self._send(task.task_id, task.reply_to, result)
        await self._ack(task)

    @_unavailable
    async def heartbeat(self, info: WorkerInfo, ttl: float) -> None:
        """One hash holds the registry (no keyspace scans); each entry carries its own expiry."""
        entry = json.dumps({"expires_at": time.time() + ttl, "info": info.model_dump(mode="json")})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.workers(), info.worker_id, entry).expire(self.keys.workers(), max(1, int(ttl)))
            await pipe.execute()

    @_unavailable
    async def remove_worker(self, worker_id: str) -> None:
        await self.redis.hdel(self.keys.workers(), worker_id)

    @_unavailable
    async def workers(self) -> list[WorkerInfo]:
        now, live, stale = time.time(), [], []
        for wid, raw in (await self.redis.hgetall(self.keys.workers())).items():
            entry = json.loads(raw)
            if entry["expires_at"] > now:
                live.append(WorkerInfo.model_validate(entry["info"]))
            else:
                stale.append(wid)
        if stale:
            await self.redis.hdel(self.keys.workers(), *stale)
        return live

    @_unavailable
    async def extend(self, tasks: Sequence[Task]) -> None:
        """Reset the idle time of tasks still being worked on, so XAUTOCLAIM leaves them alone."""
        for kind in {t.kind for t in tasks}:
            ids = [t.receipt for t in tasks if t.kind is kind and t.receipt]
            if not ids:
                continue
            try:
                await self.redis.xclaim(self.keys.stream(kind), GROUP, self.consumer, min_idle_time=0,
                                        message_ids=ids, justid=True)
            except ResponseError as exc:
                if error_code(exc) not in _GROUP_LOST:
                    raise
                # the stream expired or was trimmed with its tasks (past their deadlines), or was flushed: nothing
                # to renew

    @_unavailable
    async def ping(self) -> None:
        await self.redis.ping()

    @_unavailable
    async def queue_depth(self, kind: TaskKind) -> int:
        return int(await self.redis.xlen(self.keys.stream(kind)))

    @_unavailable
    async def queue_stats(self) -> dict[TaskKind, QueueStats]:
        """XLEN and the consumer group's XINFO GROUPS entry, read together (MULTI) per stream."""
        out = {}
        for kind in TaskKind:
            stream = self.keys.stream(kind)
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    length, groups = await pipe.xlen(stream).xinfo_groups(stream).execute()
            except ResponseError as exc:
                if "no such key" not in str(exc):
                    raise
                out[kind] = QueueStats(length=0, pending=0, lag=0)  # no stream: nothing was queued, or it expired idle
                continue
            group = next((g for g in groups if g["name"] == GROUP.encode()), None)
            if group is None:  # Redis lost the group (restarted empty): the next claim makes it at 0, so all wait
                out[kind] = QueueStats(length=int(length), pending=0, lag=int(length))
            else:
                lag = group.get("lag")  # absent before Redis 7; nil when Redis cannot count it
                out[kind] = QueueStats(length=int(length), pending=int(group["pending"]),
                                       lag=None if lag is None else int(lag))
        return out

    async def close(self) -> None:
        await self.redis.aclose()


def _read_result(raw: bytes) -> Result:
    try:
        return Result.from_json(raw)
    except ValidationError as exc:
        raise ServiceError(ErrorCode.internal,
                           f"a worker's result cannot be read ({validation_problems(exc)[0]}); {SAME_VERSION}") from exc
