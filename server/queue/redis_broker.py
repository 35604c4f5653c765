"""Redis Streams broker: consumer groups, at-least-once delivery, XAUTOCLAIM of dead workers' tasks.

A worker reads a batch in one or two round trips and completes it in one script that delivers the results of the
entries still pending and acknowledges them in the same atomic step, so a task delivered twice (its worker crashed
or stalled past the visibility timeout) has its result delivered once. Every key carries a TTL (the streams too,
and they are trimmed past the tasks' deadlines, so Redis memory is bounded by the queue limit while workers are
down). Image bytes travel as raw stream fields, never pickled. A Redis that loses its data (FLUSHALL, a restart
without persistence) costs the requests in flight a quick 503, and workers make their consumer groups again.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError, ResponseError

from dvreward_protocol.schemas import WorkerInfo
from server.errors import ErrorCode, ServiceError, validation_problems
from server.queue.base import Lease, QueueStats, queue_full, remaining, too_many
from server.queue.keys import GROUP, Keys
from server.queue.messages import Result, Task, TaskKind
from server.queue.redis_errors import RETRY_AFTER_S, error_code, unavailable
from server.queue.redis_singleflight import RedisOnceStore

log = logging.getLogger("dvreward.queue")
P = ParamSpec("P")
T = TypeVar("T")

# Every command has a socket timeout, so a frozen Redis (SIGSTOP, a stalled disk) is a 503 within
# seconds instead of a hang. A blocking read (BLPOP) waits at most half of it per call: a wait longer
# than the socket timeout must not read as an outage.
TRIM_GRACE_S = 5.0  # clock skew between API replicas and Redis that trimming by deadline tolerates
SAME_VERSION = "the API and the workers must run the same DVReward version"  # tasks and results are theirs

# Admission is one MULTI: each stream trimmed past every deadline, the tasks added (XADD: image bytes go straight
# into the stream, never through Lua, where each would cost five times as much Redis CPU), then this script, which
# takes them out again if a stream now holds more than the queue limit. Nothing runs between them, so the tasks
# are admitted all or none and concurrent submits can never overfill a queue, as one script would; the markers say,
# while they last, that Redis still holds the requests' tasks. KEYS: the streams, then the requests' markers. ARGV:
# max queue, key ttl ms, then per stream the count of tasks just added. Returns the index of a full stream and its
# depth without them, or {0, 0}. A Redis out of memory refuses the XADDs, so the transaction, whole.
_ADMITTED = """#!lua
local maxq, ttl, nstreams = tonumber(ARGV[1]), ARGV[2], #ARGV - 2
for s = 1, nstreams do
  local added = tonumber(ARGV[2 + s])
  local depth = redis.call('XLEN', KEYS[s])
  if depth > maxq then
    for t = 1, nstreams do
      local ids = {}
      for i, e in ipairs(redis.call('XREVRANGE', KEYS[t], '+', '-', 'COUNT', ARGV[2 + t])) do ids[i] = e[1] end
      redis.call('XDEL', KEYS[t], unpack(ids))
    end
    return {s, depth - added}
  end
end
for s = 1, nstreams do redis.call('PEXPIRE', KEYS[s], ttl) end
for m = nstreams + 1, #KEYS do redis.call('SET', KEYS[m], '1', 'PX', ttl) end
return {0, 0}
"""


# KEYS: the streams, then the reply lists. ARGV: group, consumer, reply ttl ms, stream count, entry count, then per
# entry: stream index, entry id, reply index (0: no result), result. A result is delivered only for an entry still
# pending (XCLAIM ... JUSTID answers those, and counts no delivery), which is then acknowledged and deleted in the
# same step: a copy of the task completed again later (a re-delivered one, or a zombie worker's) finds nothing pending
# and delivers nothing. A stream gone with its group (past every deadline, or flushed) delivers nothing either.
# Declared (#!lua) so that a Redis out of memory refuses it whole.
_COMPLETE = """#!lua
local group, consumer, ttl, nstreams, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local ids, plan, i = {}, {}, 6
for e = 1, n do
  local s = tonumber(ARGV[i])
  plan[e] = {s, ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]}
  ids[s] = ids[s] or {}
  table.insert(ids[s], ARGV[i + 1])
  i = i + 4
end
local pending = {}
for s, list in pairs(ids) do
  local args = {'XCLAIM', KEYS[s], group, consumer, 0}
  for _, id in ipairs(list) do args[#args + 1] = id end
  args[#args + 1] = 'JUSTID'
  local claimed = redis.pcall(unpack(args))
  if type(claimed) == 'table' and claimed.err and not string.find(claimed.err, '^NOGROUP') then
    return redis.error_reply(claimed.err)
  end
  if not claimed.err then
    for _, id in ipairs(claimed) do pending[s .. ' ' .. id] = true end
    redis.call('XACK', KEYS[s], group, unpack(list))
    redis.call('XDEL', KEYS[s], unpack(list))
  end
end
local out = {}
for _, p in ipairs(plan) do
  if p[3] > 0 and pending[p[1] .. ' ' .. p[2]] then
    out[p[3]] = out[p[3]] or {}
    table.insert(out[p[3]], p[4])
  end
end
local delivered = 0
for r, results in pairs(out) do
  redis.call('RPUSH', KEYS[nstreams + r], unpack(results))
  redis.call('PEXPIRE', KEYS[nstreams + r], ttl)
  delivered = delivered + #results
end
return delivered
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


Entry = tuple[bytes, dict[bytes, bytes] | None]  # a stream entry as read: id, fields (None once deleted)


@dataclass(frozen=True)
class Settled:
    """A claimed entry to acknowledge and delete, with the result its request gets, if any."""

    kind: TaskKind
    entry: str
    reply_to: str | None
    result: Result | None


def _refused(kind: TaskKind, entry: str, header: bytes, exc: ValidationError) -> Settled:
    """A task this worker cannot read (written by another DVReward version): its request hears why, and it leaves
    the stream, instead of failing every worker that claims it."""
    log.error("task %s in the %s stream cannot be read by this worker: %s", entry, kind.value, exc)
    try:
        head = json.loads(header)
    except ValueError:
        head = None
    if isinstance(head, dict) and isinstance(head.get("task_id"), str) and isinstance(head.get("reply_to"), str):
        return Settled(kind, entry, head["reply_to"], Result.failure(
            head["task_id"], ErrorCode.internal,
            f"a worker could not read this task ({validation_problems(exc)[0]}); {SAME_VERSION}"))
    return Settled(kind, entry, None, None)


def _entry_order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


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
        max_connections: int,
        consumer: str | None = None,
    ) -> None:
        """Values come from Settings (`runtime.build_broker`); `consumer` names this client in its consumer
        group (a fresh name when None). `timeout` bounds every command, and a wait for one of the
        `max_connections` (blocking reads hold theirs while they wait); tasks older than `max_task_age` (past any
        deadline) are trimmed; `lock_ttl` is how long a single-flight lock outlives its owner."""
        self.url = url
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout, decode_responses=False,
            socket_connect_timeout=timeout, socket_timeout=timeout, health_check_interval=10)
        self.redis = aioredis.Redis.from_pool(pool)
        self.block_s = timeout / 2
        self.max_age_ms = int(max_task_age * 1000)
        self.keys = Keys(prefix)
        self.max_queue = max_queue
        self.result_ttl = result_ttl
        self.visibility_ms = int(visibility_timeout * 1000)
        self.max_deliveries = max_deliveries
        self.consumer = consumer or f"c-{uuid.uuid4().hex[:12]}"
        self._complete = self.redis.register_script(_COMPLETE)
        self._once = RedisOnceStore(self.redis, self.keys, lock_ttl=lock_ttl, block_s=self.block_s)
        self._groups_ready: set[TaskKind] = set()
        self._unsettled: dict[TaskKind, tuple[list[Entry], list[Entry]]] = {}  # read by a claim that failed

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
        streams = [self.keys.stream(k) for k in kinds]
        markers = [self.keys.pending(r) for r in dict.fromkeys(t.reply_to for t in tasks)]
        async with self.redis.pipeline(transaction=True) as pipe:
            for stream in streams:
                pipe.xtrim(stream, minid=oldest_kept, approximate=False)
            for t in tasks:
                fields: dict[bytes | str, bytes | str] = {"task": t.header()}
                fields.update({f"blob{i}": b for i, b in enumerate(t.blobs)})
                pipe.xadd(streams[kinds.index(t.kind)], fields)
            pipe.eval(_ADMITTED, len(streams) + len(markers), *streams, *markers, self.max_queue, self.max_age_ms,
                      *(sum(1 for t in tasks if t.kind is k) for k in kinds))
            *_, (full, depth) = await pipe.execute()
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
                got = await self.redis.blmpop(max(0.01, min(left, self.block_s)), 1, reply_key, direction="LEFT",
                                              count=len(task_ids) - len(out))
                if got is None:
                    if not await self.redis.exists(marker):
                        raise ServiceError(ErrorCode.unavailable, f"the queue (Redis) lost {len(task_ids) - len(out)}"
                                           f" of this request's {len(task_ids)} tasks (flushed or restarted); retry",
                                           retry_after=RETRY_AFTER_S)
                    continue
                for raw in got[1]:
                    r = _read_result(raw)
                    if r.task_id in task_ids:
                        out[r.task_id] = r
        finally:
            await self.redis.delete(reply_key, marker)
        return out

    @_unavailable
    async def join(self, key: str, deadline: float) -> bytes | Lease:
        return await self._once.join(key, deadline)

    # ---- worker side ----------------------------------------------------------------------
    @_unavailable
    async def claim(self, kind: TaskKind, max_n: int, max_wait: float) -> list[Task]:
        """Entries read in one or two round trips, plus one when some were re-delivered (their delivery counts) and
        one to settle those that need no work (over-delivered, unreadable, deleted). Entries a failed claim had read
        are handed out by the next one, instead of waiting out the visibility timeout past their deadlines."""
        held = self._unsettled.pop(kind, None)
        if held is not None:
            fresh, again = held
        else:
            try:
                fresh, again = await self._read(kind, max_n, max_wait)
            except ResponseError as exc:
                if error_code(exc) not in _GROUP_LOST:
                    raise
                log.warning("the %s stream's consumer group is gone (%s: Redis was flushed, or restarted without "
                            "persistence); making it again", kind.value, error_code(exc))
                self._groups_ready.discard(kind)
                fresh, again = await self._read(kind, max_n, max_wait)
        handed_out = None
        try:
            handed_out = await self._accept(kind, fresh, again)
            return handed_out
        finally:
            if handed_out is None:  # failed or cancelled: claimed in Redis, never handed out
                self._unsettled[kind] = (fresh, again)

    async def _read(self, kind: TaskKind, max_n: int, max_wait: float) -> tuple[list[Entry], list[Entry]]:
        """(first deliveries, re-deliveries): entries idle past the visibility timeout (XAUTOCLAIM), then new ones
        (XREADGROUP)."""
        await self._ensure_group(kind)
        stream = self.keys.stream(kind)
        _, again, _ = await self.redis.xautoclaim(
            stream, GROUP, self.consumer, min_idle_time=self.visibility_ms, start_id="0-0", count=max_n
        )
        fresh: list[Entry] = []
        if len(again) < max_n:
            got = await self.redis.xreadgroup(
                GROUP, self.consumer, {stream: ">"}, count=max_n - len(again),
                block=max(1, int(min(max_wait, self.block_s) * 1000)) if not again else None,
            )
            fresh = [e for _, items in got or [] for e in items]
        return fresh, again

    async def _accept(self, kind: TaskKind, fresh: list[Entry], again: list[Entry]) -> list[Task]:
        """Turn stream entries into tasks. A first delivery needs no look-up (it cannot have completed: completing
        deletes the entry); a re-delivered one carries its delivery count, and past the limit fails at once."""
        stream = self.keys.stream(kind)
        counts = await self._deliveries(stream, [eid for eid, _ in again])
        tasks: list[Task] = []
        settle: list[Settled] = []
        for (eid, fields), first in [(e, True) for e in fresh] + [(e, False) for e in again]:
            entry = eid.decode()
            if not fields or b"task" not in fields:  # deleted while pending: nothing left to do
                settle.append(Settled(kind, entry, None, None))
                continue
            try:
                task = Task.from_header(fields[b"task"], [fields[f"blob{i}".encode()] for i in range(len(fields) - 1)],
                                        receipt=entry)
            except ValidationError as exc:
                settle.append(_refused(kind, entry, fields[b"task"], exc))
                continue
            # absent from the counts: claimed away meanwhile, so re-delivered
            task.delivery = 1 if first else counts.get(entry, 2)
            if task.delivery > self.max_deliveries:
                settle.append(Settled(kind, entry, task.reply_to, Result.failure(
                    task.task_id, ErrorCode.delivery_limit, f"task was delivered {task.delivery - 1} times without "
                    "completing (workers crashed or timed out)")))
            else:
                tasks.append(task)
        if settle:
            await self._settle(settle)
        return tasks

    async def _deliveries(self, stream: str, ids: list[bytes]) -> dict[str, int]:
        """How often each re-delivered entry was delivered (the consumer group counts it), in one XPENDING."""
        if not ids:
            return {}
        # this consumer holds these and at most a batch besides them in that range
        rows = await self.redis.xpending_range(stream, GROUP, min=min(ids, key=_entry_order),
                                               max=max(ids, key=_entry_order), count=len(ids) + 1000,
                                               consumername=self.consumer)
        return {row["message_id"].decode(): int(row["times_delivered"]) for row in rows}

    async def _settle(self, done: Sequence[Settled]) -> int:
        """One script: results delivered for the entries still pending, all of them acknowledged and deleted."""
        kinds = list(dict.fromkeys(d.kind for d in done))
        replies = list(dict.fromkeys(d.reply_to for d in done if d.reply_to is not None and d.result is not None))
        args: list[bytes | str | int] = [GROUP, self.consumer, self.result_ttl * 1000, len(kinds), len(done)]
        for d in done:
            reply = replies.index(d.reply_to) + 1 if d.reply_to is not None and d.result is not None else 0
            args += [kinds.index(d.kind) + 1, d.entry, reply, d.result.to_json() if d.result is not None else ""]
        keys = [self.keys.stream(k) for k in kinds] + [self.keys.reply(r) for r in replies]
        return int(await self._complete(keys=keys, args=args))

    @_unavailable
    async def complete(self, done: Sequence[tuple[Task, Result]]) -> None:
        if not done:
            return
        for task, _ in done:
            assert task.receipt is not None, "a claimed task carries its stream entry id"
        await self._settle([Settled(t.kind, t.receipt, t.reply_to, r) for t, r in done if t.receipt is not None])

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
