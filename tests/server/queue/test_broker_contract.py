"""The broker contract, run unchanged against the in-process MemoryBroker and the real-Redis RedisBroker.

Redis-only behaviour (re-delivery of a dead consumer's tasks, the delivery limit, key TTLs, several
API replicas sharing single-flight) follows the shared tests. Time is scripted: TTLs, visibility
timeouts and task ages are the defaults' long ones, and the tests move the brokers' clock past them
instead of sleeping, so a loaded machine cannot reorder what they assert.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import types
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.exceptions import ResponseError

from dvreward_protocol.questions import Decomposition, Question
from dvreward_protocol.schemas import WorkerInfo
from server.errors import ErrorCode, ServiceError
from server.queue import base, memory, messages, redis_broker
from server.queue.keys import GROUP
from server.queue.memory import MemoryBroker
from server.queue.messages import Decomposed, DecomposePayload, Result, Task, TaskKind, Verified, VerifyPayload
from server.queue.redis_broker import RedisBroker
from server.runtime import build_broker
from server.settings import Settings

PREFIX = "t"
MakeBroker = Callable[..., Any]


class Clock:
    """The brokers' wall clock, moved forward on demand instead of slept through.

    Real time still runs underneath, so a blocking wait still ends; `advance` adds to it and ages the
    tasks claimed in Redis but not acknowledged, as Redis's own clock would have (their idle time).
    """

    def __init__(self) -> None:
        self.offset = 0.0
        self.redis: RedisBroker | None = None  # any client of the shared Redis, to age its pending tasks

    def time(self) -> float:
        return time.time() + self.offset

    async def advance(self, seconds: float) -> None:
        self.offset += seconds
        if self.redis is None:
            return
        r = self.redis.redis
        for kind in TaskKind:
            stream = self.redis.keys.stream(kind)
            try:
                pending = await r.xpending_range(stream, GROUP, min="-", max="+", count=10_000)
            except ResponseError:  # no such stream or group yet: nothing claimed
                continue
            for entry in pending:  # same owner, no new delivery: only the idle time moves
                await r.xclaim(stream, GROUP, entry["consumer"], 0, [entry["message_id"]],
                               idle=entry["time_since_delivered"] + int(seconds * 1000), justid=True)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    scripted = types.SimpleNamespace(time=c.time, monotonic=time.monotonic)
    for module in (base, messages, memory, redis_broker):
        monkeypatch.setattr(module, "time", scripted)
    return c


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str | None:
    return None if request.param == "memory" else request.getfixturevalue("redis_url")


def queue_settings(url: str | None, **settings: Any) -> Settings:
    return Settings(redis_url=url, queue_prefix=PREFIX, **{"max_queue": 100, "result_ttl_s": 60, **settings})


@pytest.fixture
async def open_broker(clock: Clock) -> AsyncIterator[Callable[..., Any]]:
    """Brokers built as the service builds them, from Settings, closed after the test."""
    made: list[Any] = []

    def make(url: str | None, consumer: str | None = None, **settings: Any) -> Any:
        broker = build_broker(queue_settings(url, **settings), consumer)
        if isinstance(broker, RedisBroker):
            clock.redis = clock.redis or broker
        made.append(broker)
        return broker

    yield make
    for broker in made:
        await broker.close()


@pytest.fixture
def make_broker(backend: str | None, open_broker: Callable[..., Any]) -> MakeBroker:
    """Brokers of the backend under test; they share it."""
    return functools.partial(open_broker, backend)


def make_task(task_id: str, reply_to: str, payload: VerifyPayload | DecomposePayload | None = None, *,
              ttl: float = 30.0, blobs: list[bytes] | None = None) -> Task:
    deadline = messages.time.time() + ttl  # on the brokers' (scripted) clock
    return Task(task_id, reply_to, deadline, payload or VerifyPayload(questions=("q?",)), blobs or [])


def verified(task_id: str, *p: float) -> Result:
    return Result(task_id=task_id, value=Verified(p=p, p_source=("logits",) * len(p), model="tiny-v",
                                                  template_version="tv", system_prompt="sp"))


def p_of(result: Result) -> tuple[float, ...]:
    assert isinstance(result.value, Verified), result
    return result.value.p


async def claim_n(broker: Any, kind: TaskKind, n: int, timeout: float = 10.0) -> list[Task]:
    """Claim until n tasks arrived (brokers may hand them out over several calls)."""
    got: list[Task] = []
    end = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < end:
        got.extend(await broker.claim(kind, n - len(got), 0.2))
    assert len(got) == n, f"claimed {len(got)} of {n} tasks"
    return got


async def queued_replies(broker: Any, reply_to: str) -> int:
    """How many results wait in a reply queue (a white-box probe)."""
    if isinstance(broker, MemoryBroker):
        q = broker._replies.get(reply_to)
        return q.qsize() if q is not None else 0
    return int(await broker.redis.llen(broker.keys.reply(reply_to)))


async def waiting(broker: Any, key: str, n: int, timeout: float = 30.0) -> None:
    """Return once n callers wait for the computation of `key` (a white-box probe).

    In process a caller registers before its first await, so every caller task started before this
    one has registered once it yields; over Redis, waiters register in a set the owner publishes to.
    """
    if isinstance(broker, MemoryBroker):
        await asyncio.sleep(0)
        return
    end = time.monotonic() + timeout
    while await broker.redis.scard(broker.keys.waiters(key)) < n:
        assert time.monotonic() < end, f"fewer than {n} callers ever waited for {key!r}"
        await asyncio.sleep(0.01)


def worker_info(worker_id: str, heartbeat_at: float = 1.0) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, verifier="tiny-v", decomposer=None, pipeline=None, template_version="tv",
                      capacity=4, started_at=1.0, heartbeat_at=heartbeat_at)


# ---- shared contract ---------------------------------------------------------------------------
async def test_round_trip_keeps_header_payload_and_blob_bytes(make_broker: MakeBroker) -> None:
    broker = make_broker()
    blobs0 = [bytes(range(256)) * 3, b"\x89PNG\r\n\x1a\n\x00\x00", b"\x00"]
    t0 = make_task("r1:v0", "r1", VerifyPayload(questions=("Is it red?", "Ünïcode — ok?")), blobs=blobs0)
    t1 = make_task("r1:v1", "r1", VerifyPayload(questions=("Is it blue?",)), blobs=[b"\xff" * 1000])
    dec = make_task("r1:dec", "r1", DecomposePayload(prompt="a red cat"))
    await broker.submit([t0, t1, dec])
    assert await broker.queue_depth(TaskKind.verify) == 2
    assert await broker.queue_depth(TaskKind.decompose) == 1

    claimed = {t.task_id: t for t in await claim_n(broker, TaskKind.verify, 2)}
    assert set(claimed) == {"r1:v0", "r1:v1"}, "a verify claim must not return decompose tasks"
    for sent in (t0, t1):
        got = claimed[sent.task_id]
        assert (got.kind, got.reply_to, got.deadline, got.payload) == (sent.kind, sent.reply_to, sent.deadline,
                                                                       sent.payload)
        assert got.blobs == sent.blobs, "image bytes must arrive byte for byte"
        assert got.delivery == 1
        assert not got.expired
    (got_dec,) = await claim_n(broker, TaskKind.decompose, 1)
    assert got_dec.payload == DecomposePayload(prompt="a red cat") and got_dec.blobs == []

    decomposition = Decomposition(prompt="a red cat", questions=(Question(id="q1", text="Is there a cat?",
                                                                          tag="Existence"),))
    await broker.complete([(claimed["r1:v0"], verified("r1:v0", 0.25, 0.75))])
    await broker.complete([(claimed["r1:v1"], Result.failure("r1:v1", ErrorCode.bad_image, "not an image"))])
    await broker.complete([(got_dec, Result(task_id="r1:dec", value=Decomposed(decomposition=decomposition)))])
    results = await broker.gather("r1", {"r1:v0", "r1:v1", "r1:dec"}, base.time.time() + 5)
    assert results["r1:v0"] == verified("r1:v0", 0.25, 0.75), "typed values arrive equal"
    assert results["r1:v1"].value is None and results["r1:v1"].error is not None
    assert (results["r1:v1"].error.code, results["r1:v1"].error.message) == (ErrorCode.bad_image, "not an image")
    assert results["r1:dec"].value == Decomposed(decomposition=decomposition)
    assert await broker.queue_depth(TaskKind.verify) == 0


async def test_claim_on_an_empty_queue_returns_nothing(make_broker: MakeBroker) -> None:
    broker = make_broker()
    assert await broker.claim(TaskKind.verify, 4, 0.05) == []


async def test_gather_times_out_with_timeout_error(make_broker: MakeBroker, clock: Clock) -> None:
    broker = make_broker()
    await broker.submit([make_task("r2:v0", "r2"), make_task("r2:v1", "r2")])
    (first, *_) = await claim_n(broker, TaskKind.verify, 2)
    await broker.complete([(first, verified(first.task_id, 0.5))])
    with pytest.raises(ServiceError) as err:
        await broker.gather("r2", {"r2:v0", "r2:v1"}, clock.time() + 0.3)
    assert err.value.code is ErrorCode.timeout and err.value.status == 504
    assert "1 of 2" in err.value.message


async def test_bounded_queue_refuses_with_rate_limited_and_retry_after(make_broker: MakeBroker) -> None:
    broker = make_broker(max_queue=3)
    await broker.submit([make_task(f"r3:v{i}", "r3") for i in range(2)])
    with pytest.raises(ServiceError) as err:
        await broker.submit([make_task(f"r3:w{i}", "r3") for i in range(2)])
    assert err.value.code is ErrorCode.rate_limited and err.value.status == 429
    assert err.value.retry_after is not None and err.value.retry_after > 0
    assert "verify" in err.value.message
    assert await broker.queue_depth(TaskKind.verify) == 2, "a refused submit must enqueue nothing"
    await broker.submit([make_task("r3:v2", "r3")])  # exactly at the bound is fine
    await broker.submit([make_task("r3:d0", "r3", DecomposePayload(prompt="p"))])  # the other queue
    assert await broker.queue_depth(TaskKind.verify) == 3
    assert await broker.queue_depth(TaskKind.decompose) == 1


async def test_a_refused_submit_leaves_no_task_of_any_kind(make_broker: MakeBroker) -> None:
    """Tasks of two kinds, one queue full: neither queue keeps any of them, and no worker ever sees one."""
    broker = make_broker(max_queue=2)
    await broker.submit([make_task("m:v0", "m"), make_task("m:v1", "m")])
    with pytest.raises(ServiceError) as err:
        await broker.submit([make_task("n:d0", "n", DecomposePayload(prompt="p")), make_task("n:v0", "n")])
    assert err.value.code is ErrorCode.rate_limited and "verify queue holds 2" in err.value.message
    assert await broker.queue_depth(TaskKind.decompose) == 0 and await broker.queue_depth(TaskKind.verify) == 2
    assert {t.task_id for t in await claim_n(broker, TaskKind.verify, 2)} == {"m:v0", "m:v1"}
    assert await broker.claim(TaskKind.decompose, 4, 0.05) == []


async def test_more_tasks_than_the_queue_holds_is_413_not_a_429_forever(make_broker: MakeBroker) -> None:
    broker = make_broker(max_queue=3)
    with pytest.raises(ServiceError) as err:
        await broker.submit([make_task(f"big:v{i}", "big") for i in range(4)])
    assert err.value.code is ErrorCode.too_large and err.value.status == 413
    assert "4" in err.value.message and "3" in err.value.message and err.value.retry_after is None
    assert await broker.queue_depth(TaskKind.verify) == 0


async def test_admission_is_atomic_under_concurrent_submits(make_broker: MakeBroker) -> None:
    """32 concurrent one-task submits against a bound of 16: exactly 16 get in (XLEN-then-XADD let 28 in)."""
    first = make_broker(max_queue=16)
    # Redis: several clients, as several API replicas; the in-process queue exists once per process.
    brokers = [first] + [first if isinstance(first, MemoryBroker) else make_broker(max_queue=16) for _ in range(3)]
    outcomes = await asyncio.gather(*(brokers[i % 4].submit([make_task(f"c:v{i}", "c")]) for i in range(32)),
                                    return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, ServiceError)]
    assert all(o.code is ErrorCode.rate_limited for o in refused)
    assert len(refused) == 16 and outcomes.count(None) == 16
    assert await brokers[0].queue_depth(TaskKind.verify) == 16


async def test_claimed_tasks_count_against_the_bound_until_completed(make_broker: MakeBroker) -> None:
    """Both brokers count the same thing: queued plus claimed-but-not-completed tasks."""
    broker = make_broker(max_queue=2)
    await broker.submit([make_task("k:v0", "k"), make_task("k:v1", "k")])
    t0, _ = await claim_n(broker, TaskKind.verify, 2)
    assert await broker.queue_depth(TaskKind.verify) == 2
    with pytest.raises(ServiceError) as err:
        await broker.submit([make_task("k:v2", "k")])
    assert err.value.code is ErrorCode.rate_limited
    await broker.complete([(t0, verified(t0.task_id, 0.5))])
    assert await broker.queue_depth(TaskKind.verify) == 1
    await broker.submit([make_task("k:v2", "k")])


async def test_completing_a_task_twice_delivers_one_result(make_broker: MakeBroker, clock: Clock) -> None:
    broker = make_broker()
    await broker.submit([make_task("r4:v0", "r4"), make_task("r4:v1", "r4")])
    t0, t1 = sorted(await claim_n(broker, TaskKind.verify, 2), key=lambda t: t.task_id)
    await broker.complete([(t0, verified(t0.task_id, 0.1))])
    await broker.complete([(t0, verified(t0.task_id, 0.9))])  # e.g. a re-delivered copy finishing late
    assert await queued_replies(broker, "r4") == 1
    await broker.complete([(t1, verified(t1.task_id, 0.2))])
    assert await queued_replies(broker, "r4") == 2
    got = await broker.gather("r4", {t0.task_id, t1.task_id}, clock.time() + 5)
    assert p_of(got[t0.task_id]) == (0.1,), "the first result wins"


class Gate:
    """A computation that starts, then waits until the test lets it finish: callers meet it in flight."""

    def __init__(self, value: bytes | BaseException) -> None:
        self.value = value
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def compute(self) -> bytes:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value

    async def open_when_waited_for(self, broker: Any, key: str, waiters: int) -> None:
        await asyncio.wait_for(self.started.wait(), 30)
        await waiting(broker, key, waiters)
        self.release.set()


async def test_singleflight_computes_once_for_concurrent_callers(make_broker: MakeBroker, clock: Clock) -> None:
    broker = make_broker()
    gate = Gate(b'{"value": 42}')
    deadline = clock.time() + 30
    callers = [asyncio.create_task(base.singleflight(broker, "k1", gate.compute, 60, deadline)) for _ in range(5)]
    await gate.open_when_waited_for(broker, "k1", 4)
    out = await asyncio.gather(*callers)
    assert gate.calls == 1
    assert [v for v, _ in out] == [b'{"value": 42}'] * 5
    assert sorted(c for _, c in out) == [False, True, True, True, True], "exactly one caller computed"
    assert await base.singleflight(broker, "k1", gate.compute, 60, deadline) == (b'{"value": 42}', True)
    assert gate.calls == 1
    assert await base.singleflight(broker, "k2", gate.compute, 60, deadline) == (b'{"value": 42}', False)
    assert gate.calls == 2, "another key computes anew"


async def test_singleflight_value_expires_after_its_ttl(make_broker: MakeBroker, clock: Clock) -> None:
    broker = make_broker()
    gate = Gate(b"v")
    gate.release.set()
    assert await base.singleflight(broker, "ttl", gate.compute, 60, clock.time() + 30) == (b"v", False)
    await clock.advance(30)
    assert await base.singleflight(broker, "ttl", gate.compute, 60, clock.time() + 30) == (b"v", True)
    if isinstance(broker, MemoryBroker):  # Redis expires keys on its own clock, which no test can move
        await clock.advance(31)
        assert await base.singleflight(broker, "ttl", gate.compute, 60, clock.time() + 30) == (b"v", False)


async def test_singleflight_failure_reaches_every_waiter_and_is_not_cached(
    make_broker: MakeBroker, clock: Clock,
) -> None:
    broker = make_broker()
    gate = Gate(ServiceError(ErrorCode.decomposition_failed, "the decomposer wrote no JSON"))
    deadline = clock.time() + 30
    callers = [asyncio.create_task(base.singleflight(broker, "k", gate.compute, 60, deadline)) for _ in range(5)]
    await gate.open_when_waited_for(broker, "k", 4)
    out = await asyncio.gather(*callers, return_exceptions=True)
    assert gate.calls == 1
    for exc in out:
        assert isinstance(exc, ServiceError), exc
        assert exc.code is ErrorCode.decomposition_failed and "no JSON" in exc.message

    works = Gate(b"ok")
    works.release.set()
    assert await base.singleflight(broker, "k", works.compute, 60, deadline) == (b"ok", False)
    assert works.calls == 1, "a failure must not be cached"


async def test_singleflight_unexpected_exception_does_not_strand_waiters(
    make_broker: MakeBroker, clock: Clock,
) -> None:
    broker = make_broker()
    gate = Gate(RuntimeError("bug in compute"))
    deadline = clock.time() + 30  # a stranded waiter would end in a timeout error at this deadline
    callers = [asyncio.create_task(base.singleflight(broker, "crash", gate.compute, 60, deadline)) for _ in range(3)]
    await gate.open_when_waited_for(broker, "crash", 2)
    out = await asyncio.gather(*callers, return_exceptions=True)
    assert gate.calls == 1 and sum(isinstance(e, RuntimeError) for e in out) >= 1, out
    for exc in out:
        assert isinstance(exc, RuntimeError | ServiceError), exc
        assert not (isinstance(exc, ServiceError) and exc.code is ErrorCode.timeout), f"waiter stranded: {exc}"

    works = Gate(b"fine")
    works.release.set()
    assert await base.singleflight(broker, "crash", works.compute, 60, deadline) == (b"fine", False)


async def test_singleflight_cancelled_compute_releases_waiters(make_broker: MakeBroker, clock: Clock) -> None:
    """The computing request is cancelled (its client went away): waiters hear at once, and can recompute."""
    broker = make_broker()
    gate = Gate(b"never")
    deadline = clock.time() + 30  # a waiter left to its deadline ends in a timeout error, not "cancelled"
    owner = asyncio.create_task(base.singleflight(broker, "cancel", gate.compute, 60, deadline))
    await asyncio.wait_for(gate.started.wait(), 30)
    unused = Gate(AssertionError("a waiter must not compute while the owner holds the key"))
    waiter = asyncio.create_task(base.singleflight(broker, "cancel", unused.compute, 60, deadline))
    await waiting(broker, "cancel", 1)
    owner.cancel()
    with pytest.raises(ServiceError) as err:
        await asyncio.wait_for(waiter, 60)
    assert err.value.code is ErrorCode.unavailable and "cancelled" in err.value.message
    assert unused.calls == 0

    works = Gate(b"fine")
    works.release.set()
    assert await base.singleflight(broker, "cancel", works.compute, 60, deadline) == (b"fine", False)


async def test_heartbeat_workers_and_remove_worker(make_broker: MakeBroker) -> None:
    broker = make_broker()
    assert await broker.workers() == []
    await broker.heartbeat(worker_info("w1", 1.0), ttl=60)
    await broker.heartbeat(worker_info("w2", 1.0), ttl=60)
    await broker.heartbeat(worker_info("w1", 2.0), ttl=60)  # a later beat replaces the record
    workers = sorted(await broker.workers(), key=lambda w: w.worker_id)
    assert workers == [worker_info("w1", 2.0), worker_info("w2", 1.0)]
    await broker.remove_worker("w1")
    assert [w.worker_id for w in await broker.workers()] == ["w2"]
    await broker.remove_worker("never-registered")  # harmless
    assert [w.worker_id for w in await broker.workers()] == ["w2"]


async def test_silent_worker_disappears_after_its_ttl(make_broker: MakeBroker, clock: Clock) -> None:
    broker = make_broker()
    await broker.heartbeat(worker_info("silent"), ttl=60)
    await broker.heartbeat(worker_info("beating"), ttl=60)
    await clock.advance(59)
    assert sorted(w.worker_id for w in await broker.workers()) == ["beating", "silent"]
    await broker.heartbeat(worker_info("beating"), ttl=60)
    await clock.advance(2)
    assert [w.worker_id for w in await broker.workers()] == ["beating"], "a worker that stops beating drops out"


async def test_expired_tasks_are_claimed_flagged_expired(make_broker: MakeBroker, clock: Clock) -> None:
    broker = make_broker()
    await broker.submit([make_task("r5:old", "r5", ttl=10), make_task("r5:new", "r5", ttl=30)])
    await clock.advance(20)
    got = {t.task_id: t for t in await claim_n(broker, TaskKind.verify, 2)}
    assert got["r5:old"].expired and not got["r5:new"].expired


async def test_ping(make_broker: MakeBroker) -> None:
    await make_broker().ping()


async def test_queue_stats_count_queued_claimed_and_undelivered_tasks(make_broker: MakeBroker) -> None:
    """What /metrics and an autoscaler read: length (queued + claimed), pending (claimed), lag (undelivered)."""
    broker = make_broker()
    assert await broker.queue_stats() == {k: base.QueueStats(length=0, pending=0, lag=0) for k in TaskKind}
    await broker.submit([make_task(f"qs:v{i}", "qs") for i in range(5)]
                        + [make_task("qs:d0", "qs", DecomposePayload(prompt="p"))])
    stats = await broker.queue_stats()
    assert stats[TaskKind.verify] == base.QueueStats(length=5, pending=0, lag=5)
    assert stats[TaskKind.decompose] == base.QueueStats(length=1, pending=0, lag=1)
    first, second = sorted(await claim_n(broker, TaskKind.verify, 2), key=lambda t: t.task_id)
    assert (await broker.queue_stats())[TaskKind.verify] == base.QueueStats(length=5, pending=2, lag=3)
    await broker.complete([(first, verified(first.task_id, 0.5))])
    await broker.complete([(second, verified(second.task_id, 0.5))])
    assert (await broker.queue_stats())[TaskKind.verify] == base.QueueStats(length=3, pending=0, lag=3)
    assert (await broker.queue_stats())[TaskKind.decompose] == base.QueueStats(length=1, pending=0, lag=1)


# ---- Redis only --------------------------------------------------------------------------------
@pytest.fixture
def redis_brokers(redis_url: str, open_broker: Callable[..., Any]) -> Callable[..., RedisBroker]:
    def make(consumer: str, **settings: Any) -> RedisBroker:
        broker = open_broker(redis_url, consumer, **settings)
        assert isinstance(broker, RedisBroker)
        return broker

    return make


async def test_redis_lag_is_unknown_not_zero_when_redis_cannot_count_it(
    redis_brokers: Callable[..., RedisBroker],
) -> None:
    """Completed tasks leave the stream (XDEL). When the newest delivered one goes while older ones stay and
    others wait, Redis 7 answers a nil lag (KEDA reads it as 0): the stats say unknown, never 0."""
    api, older, newer = redis_brokers("api"), redis_brokers("older"), redis_brokers("newer")
    await api.submit([make_task(f"lag:v{i}", "lag") for i in range(2)])
    (held,) = await claim_n(older, TaskKind.verify, 1)
    (done,) = await claim_n(newer, TaskKind.verify, 1)
    await api.submit([make_task("lag:v2", "lag")])
    await newer.complete([(done, verified(done.task_id, 0.5))])
    stats = (await api.queue_stats())[TaskKind.verify]
    assert stats == base.QueueStats(length=2, pending=1, lag=None)
    (last,) = await claim_n(newer, TaskKind.verify, 1)  # a later delivery makes the lag countable again
    assert last.task_id == "lag:v2" and held.task_id == "lag:v0"
    assert (await api.queue_stats())[TaskKind.verify] == base.QueueStats(length=2, pending=2, lag=0)


async def test_redis_redelivers_a_dead_consumers_task_via_xautoclaim(
    redis_brokers: Callable[..., RedisBroker], clock: Clock,
) -> None:
    api, dead, alive = redis_brokers("api"), redis_brokers("dead"), redis_brokers("alive")
    await api.submit([make_task("r6:v0", "r6", blobs=[b"img-bytes"])])
    (lost,) = await claim_n(dead, TaskKind.verify, 1)  # claimed, never completed: the worker "died"
    assert lost.delivery == 1
    await clock.advance(59)
    assert await alive.claim(TaskKind.verify, 4, 0.05) == [], "not re-delivered before the visibility timeout"

    await clock.advance(2)
    (again,) = await claim_n(alive, TaskKind.verify, 1)
    assert again.task_id == "r6:v0" and again.delivery == 2 and again.blobs == [b"img-bytes"]
    pending = await alive.redis.xpending(alive.keys.stream(TaskKind.verify), GROUP)
    assert {c["name"]: c["pending"] for c in pending["consumers"]} == {b"alive": 1}

    await alive.complete([(again, verified("r6:v0", 0.3))])
    got = await api.gather("r6", {"r6:v0"}, clock.time() + 5)
    assert p_of(got["r6:v0"]) == (0.3,)
    await dead.complete([(lost, verified("r6:v0", 0.9))])  # the zombie finishes late
    assert await api.redis.llen(api.keys.reply("r6")) == 0, "a late duplicate must not deliver a second result"
    assert await api.redis.xlen(api.keys.stream(TaskKind.verify)) == 0


async def test_redis_delivery_limit_fails_the_task_with_a_clear_error(
    redis_brokers: Callable[..., RedisBroker], clock: Clock,
) -> None:
    api = redis_brokers("api", max_deliveries=2)
    await api.submit([make_task("r7:v0", "r7")])
    deliveries = []
    for n in range(2):  # two consumers in turn claim it and die
        (got,) = await claim_n(redis_brokers(f"crash{n}", max_deliveries=2), TaskKind.verify, 1)
        assert got.task_id == "r7:v0"
        deliveries.append(got.delivery)
        await clock.advance(61)
    assert deliveries == [1, 2]

    third = redis_brokers("third", max_deliveries=2)
    assert await third.claim(TaskKind.verify, 1, 0.1) == [], "a task past its delivery limit is not handed out"
    result = (await api.gather("r7", {"r7:v0"}, clock.time() + 5))["r7:v0"]
    assert result.error is not None and result.error.code is ErrorCode.delivery_limit
    assert "delivered 2 times" in result.error.message
    stream = api.keys.stream(TaskKind.verify)
    assert await api.redis.xlen(stream) == 0
    assert (await api.redis.xpending(stream, GROUP))["pending"] == 0


async def test_redis_every_key_has_a_ttl(redis_brokers: Callable[..., RedisBroker], clock: Clock) -> None:
    broker = redis_brokers("w")
    await broker.submit([make_task("r8:v0", "r8"), make_task("r8:v1", "r8")])
    t0, t1 = await claim_n(broker, TaskKind.verify, 2)
    await broker.complete([(t0, verified(t0.task_id, 0.5))])  # t1's result stays undelivered
    await broker.heartbeat(worker_info("w"), ttl=30)

    async def value() -> bytes:
        return b"v"

    await base.singleflight(broker, "cached", value, 60, clock.time() + 5)
    keys = [k.decode() async for k in broker.redis.scan_iter(match=f"{PREFIX}:*")]
    assert any(":pending:" in k for k in keys) and any(":reply:" in k for k in keys)
    assert any(":sf:value:" in k for k in keys) and f"{PREFIX}:workers" in keys and any(":stream:" in k for k in keys)
    no_ttl = [k for k in keys if await broker.redis.ttl(k) < 0]
    assert no_ttl == [], f"keys without a TTL: {no_ttl}"


async def test_redis_streams_are_trimmed_past_the_tasks_deadlines(
    redis_brokers: Callable[..., RedisBroker], clock: Clock,
) -> None:
    """Workers down: timed-out tasks (and their image bytes) leave the stream instead of filling Redis."""
    broker = redis_brokers("api", max_queue=3, request_timeout_s=55)  # tasks older than 55 + 5 s are trimmed
    await broker.submit([make_task(f"old:v{i}", "old", blobs=[b"x" * 100_000]) for i in range(3)])
    with pytest.raises(ServiceError) as err:
        await broker.submit([make_task("new:v0", "new")])
    assert err.value.code is ErrorCode.rate_limited
    await clock.advance(61)
    await broker.submit([make_task("new:v0", "new")])  # the three old ones are past any deadline
    stream = broker.keys.stream(TaskKind.verify)
    assert await broker.redis.xlen(stream) == 1
    assert 0 < await broker.redis.pttl(stream) <= 60_000, "an idle stream expires with its last task"
    (task,) = await claim_n(broker, TaskKind.verify, 1)
    assert task.task_id == "new:v0" and not task.expired


async def test_redis_singleflight_across_api_replicas(
    redis_brokers: Callable[..., RedisBroker], clock: Clock,
) -> None:
    replicas = [redis_brokers(f"api{i}") for i in range(3)]
    gate = Gate(b"shared")
    deadline = clock.time() + 30
    callers = [asyncio.create_task(base.singleflight(r, "x", gate.compute, 60, deadline))
               for r in replicas for _ in "ab"]
    await gate.open_when_waited_for(replicas[0], "x", 5)
    out = await asyncio.gather(*callers)
    assert gate.calls == 1 and {v for v, _ in out} == {b"shared"}


async def test_redis_claim_recovers_when_the_consumer_group_is_lost(
    redis_brokers: Callable[..., RedisBroker],
) -> None:
    """A Redis restarted without persistence (or flushed) loses the group; workers must not crash on NOGROUP."""
    api, worker = redis_brokers("api"), redis_brokers("w")
    await api.submit([make_task("r9:v0", "r9")])
    (before,) = await claim_n(worker, TaskKind.verify, 1)
    await api.redis.flushall()
    await worker.complete([(before, verified(before.task_id, 0.5))])  # finishing across the loss is fine
    await api.submit([make_task("r9:v1", "r9")])  # stream re-created, group not
    (task,) = await claim_n(worker, TaskKind.verify, 1)
    assert task.task_id == "r9:v1"


async def blocked_in(broker: RedisBroker, command: str, timeout: float = 30.0) -> None:
    """Return once a client of this Redis is blocked in `command` (a white-box probe: CLIENT LIST)."""
    end = time.monotonic() + timeout
    while not any(c.get("cmd") == command and "b" in c.get("flags", "") for c in await broker.redis.client_list()):
        assert time.monotonic() < end, f"no client ever blocked in {command}"
        await asyncio.sleep(0.01)


async def test_redis_a_claim_blocked_while_redis_is_flushed_recovers(
    redis_brokers: Callable[..., RedisBroker],
) -> None:
    """FLUSHALL under a worker blocked in XREADGROUP: Redis answers UNBLOCKED (not NOGROUP), the worker makes its group
    again and goes on."""
    api, worker = redis_brokers("api"), redis_brokers("w", redis_timeout_s=8.0, lock_ttl_s=16)  # 4 s reads
    await api.submit([make_task("f1:v0", "f1")])
    (first,) = await claim_n(worker, TaskKind.verify, 1)
    await worker.complete([(first, verified(first.task_id, 0.5))])
    blocked = asyncio.create_task(worker.claim(TaskKind.verify, 4, 3.0))
    await blocked_in(api, "xreadgroup")
    await api.redis.flushall()
    assert await asyncio.wait_for(blocked, 30) == []
    await api.submit([make_task("f1:v1", "f1")])
    (task,) = await claim_n(worker, TaskKind.verify, 1)
    assert task.task_id == "f1:v1"


async def test_redis_a_request_whose_tasks_redis_lost_fails_fast_with_503(
    redis_brokers: Callable[..., RedisBroker], clock: Clock,
) -> None:
    """Its tasks flushed, no result can come: 503 within a blocking read, not a 504 at the deadline."""
    api = redis_brokers("api", redis_timeout_s=2.0)
    await api.submit([make_task("f2:v0", "f2", ttl=60), make_task("f2:v1", "f2", ttl=60)])
    gathering = asyncio.create_task(api.gather("f2", {"f2:v0", "f2:v1"}, clock.time() + 60))
    await blocked_in(api, "blmpop")
    await api.redis.flushall()
    t0 = time.monotonic()
    with pytest.raises(ServiceError) as err:
        await asyncio.wait_for(gathering, 30)
    assert err.value.code is ErrorCode.unavailable and err.value.retry_after
    assert "lost 2 of this request's 2 tasks" in err.value.message
    assert time.monotonic() - t0 < 10, "the request waited for results that could no longer come"


async def test_redis_a_lock_left_by_a_dead_owner_is_taken_over_within_its_ttl(
    redis_brokers: Callable[..., RedisBroker], clock: Clock,
) -> None:
    """An API that died computing leaves its lock, never renewed: callers take it over once it lapses (one of them
    computes, the others hear its value), long before their deadline."""
    api = redis_brokers("api2", lock_ttl_s=2.0, redis_timeout_s=1.0)
    await api.redis.set(api.keys.lock("orphan"), api.keys.waiter("dead-api"), px=2000)  # as a SIGKILL leaves it
    gate = Gate(b"recomputed")
    gate.release.set()
    t0 = time.monotonic()
    deadline = clock.time() + 60  # a caller left to its deadline ends in a timeout error
    out = await asyncio.wait_for(asyncio.gather(*(base.singleflight(api, "orphan", gate.compute, 60, deadline)
                                                  for _ in range(3))), 30)
    assert gate.calls == 1 and sorted(out) == [(b"recomputed", False)] + [(b"recomputed", True)] * 2
    assert time.monotonic() - t0 < 8, "the lapsed lock was taken over late"


async def test_redis_a_live_owner_keeps_its_lock_past_its_ttl(
    redis_brokers: Callable[..., RedisBroker], clock: Clock,
) -> None:
    """The owner renews its lock while computing: a computation longer than the lock's TTL is not taken over."""
    owner, other = (redis_brokers(n, lock_ttl_s=2.0, redis_timeout_s=1.0) for n in ("owner", "other"))
    gate = Gate(b"slow")
    deadline = clock.time() + 60
    first = asyncio.create_task(base.singleflight(owner, "long", gate.compute, 60, deadline))
    await asyncio.wait_for(gate.started.wait(), 30)
    second = asyncio.create_task(base.singleflight(other, "long", gate.compute, 60, deadline))
    await waiting(other, "long", 1)
    await asyncio.sleep(5)  # two and a half lock TTLs (Redis expires keys on its own clock)
    assert gate.calls == 1, "a waiter took over the lock of a live owner"
    gate.release.set()
    assert sorted(await asyncio.gather(first, second)) == [(b"slow", False), (b"slow", True)]


class SteppedLink:
    """A TCP hop to Redis that passes what its client sends one chunk (a command, or a pipeline) at a time, as the
    test steps it, until it is opened: it scripts how that client's commands interleave with another client's."""

    def __init__(self, redis_url: str) -> None:
        self.port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        self.url = ""
        self.allowed = asyncio.Semaphore(0)
        self.opened = False
        self.answered = asyncio.Event()
        self.links: list[tuple[asyncio.Task[Any] | None, asyncio.StreamWriter]] = []

    async def step(self) -> None:
        """Pass the client's next chunk, and return once Redis has answered it."""
        self.answered.clear()
        self.allowed.release()
        await asyncio.wait_for(self.answered.wait(), 30)

    def open(self) -> None:
        self.opened = True
        self.allowed.release()

    async def __aenter__(self) -> SteppedLink:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for _, writer in self.links:
            writer.close()  # both directions then end
        await asyncio.gather(*(task for task, _ in self.links if task is not None), return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.links.append((asyncio.current_task(), client_w))
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.port)

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if not self.opened:
                    await self.allowed.acquire()
                redis_w.write(data)
                await redis_w.drain()
            redis_w.close()

        async def downstream() -> None:
            while data := await redis_r.read(65536):
                client_w.write(data)
                await client_w.drain()
                self.answered.set()
            client_w.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)


async def test_redis_joining_and_taking_the_lock_are_one_step(
    redis_url: str, redis_brokers: Callable[..., RedisBroker], open_broker: Callable[..., Any], clock: Clock,
) -> None:
    """A caller that joined as a waiter while the owner computed gets the owner's value, even when the owner finishes
    right after the caller joined: registering and taking the lock in two steps let it compute again in between.
    The late caller's commands reach Redis one at a time, until it is registered; then the owner finishes."""
    owner = redis_brokers("owner")
    gate = Gate(b"once")
    deadline = clock.time() + 30
    computing = asyncio.create_task(base.singleflight(owner, "race", gate.compute, 60, deadline))
    await asyncio.wait_for(gate.started.wait(), 30)
    again = Gate(b"twice")
    again.release.set()
    async with SteppedLink(redis_url) as link:
        late = open_broker(link.url, "late")
        joining = asyncio.create_task(base.singleflight(late, "race", again.compute, 60, deadline))
        for _ in range(20):  # its connection's handshake, then the commands of joining
            if await owner.redis.scard(owner.keys.waiters("race")):
                break
            await link.step()
        assert await owner.redis.scard(owner.keys.waiters("race")) == 1, "the late caller never joined"
        gate.release.set()  # the owner finishes between the late caller's commands
        assert await asyncio.wait_for(computing, 30) == (b"once", False)
        link.open()
        assert await asyncio.wait_for(joining, 30) == (b"once", True)
    assert again.calls == 0, "a caller that had joined computed the value again"


async def test_redis_waits_longer_than_the_socket_timeout_are_not_outages(
    redis_brokers: Callable[..., RedisBroker], clock: Clock,
) -> None:
    """A result or a single-flight value that takes longer than the Redis command timeout (real seconds)."""
    api, worker = redis_brokers("api", redis_timeout_s=2.0), redis_brokers("w", redis_timeout_s=2.0)
    await api.submit([make_task("r10:v0", "r10")])
    (task,) = await claim_n(worker, TaskKind.verify, 1)

    async def slow_worker() -> None:
        await asyncio.sleep(2.5)
        await worker.complete([(task, verified(task.task_id, 0.4))])

    async def slow_compute() -> bytes:
        await asyncio.sleep(2.5)
        return b"slow"

    deadline = clock.time() + 30
    results, leader, waiter, _ = await asyncio.gather(
        api.gather("r10", {"r10:v0"}, deadline),
        base.singleflight(worker, "slow", slow_compute, 60, deadline),
        base.singleflight(api, "slow", slow_compute, 60, deadline),
        slow_worker(),
    )
    assert p_of(results["r10:v0"]) == (0.4,)
    assert sorted([leader, waiter]) == [(b"slow", False), (b"slow", True)]


async def test_redis_extend_keeps_a_long_task_from_being_reclaimed(
    redis_brokers: Callable[..., RedisBroker], clock: Clock,
) -> None:
    api, busy, other = redis_brokers("api"), redis_brokers("busy"), redis_brokers("other")
    await api.submit([make_task("r11:v0", "r11")])
    (task,) = await claim_n(busy, TaskKind.verify, 1)
    for _ in range(3):  # three times the visibility timeout of work, with the claim renewed in between
        await clock.advance(40)
        await busy.extend([task])
        assert await other.claim(TaskKind.verify, 1, 0.01) == [], "a renewed task must not be re-delivered"
    await clock.advance(61)  # renewal stops (the worker died): now it is re-delivered
    (again,) = await claim_n(other, TaskKind.verify, 1)
    assert again.task_id == "r11:v0" and again.delivery == 2


async def test_redis_a_task_from_another_version_fails_its_request_not_the_workers(
    redis_brokers: Callable[..., RedisBroker], clock: Clock,
) -> None:
    """An entry whose header this version cannot read: its request hears why, and it leaves the stream."""
    api, worker = redis_brokers("api"), redis_brokers("w")
    await api.submit([make_task("r12:v0", "r12")])  # makes the stream and its group
    stream = api.keys.stream(TaskKind.verify)
    older = {"task_id": "r12:old", "kind": "verify", "reply_to": "r12", "deadline": clock.time() + 30,
             "payload": {"questions": ["q?"]}}  # an older layout: kind beside the payload, not in it
    await api.redis.xadd(stream, {"task": json.dumps(older), "blob0": b"img"})
    await api.redis.xadd(stream, {"task": b"\xff not json"})
    (task,) = await claim_n(worker, TaskKind.verify, 1)
    assert task.task_id == "r12:v0", "readable tasks still flow"
    assert await worker.claim(TaskKind.verify, 4, 0.05) == []
    assert await api.redis.xlen(stream) == 1, "unreadable entries are dropped, the claimed one stays"
    result = (await api.gather("r12", {"r12:old"}, clock.time() + 5))["r12:old"]
    assert result.error is not None and result.error.code is ErrorCode.internal
    assert "same DVReward version" in result.error.message and "kind" in result.error.message


async def test_redis_a_result_from_another_version_is_a_clear_500(
    redis_brokers: Callable[..., RedisBroker], clock: Clock,
) -> None:
    api = redis_brokers("api")
    older = {"task_id": "r13:v0", "data": {"p": [0.5]}, "error_code": None, "error": None}
    await api.redis.rpush(api.keys.reply("r13"), json.dumps(older))
    with pytest.raises(ServiceError) as err:
        await api.gather("r13", {"r13:v0"}, clock.time() + 5)
    assert err.value.code is ErrorCode.internal and err.value.status == 500
    assert "same DVReward version" in err.value.message
