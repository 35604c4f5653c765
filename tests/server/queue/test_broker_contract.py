"""The broker contract, run unchanged against the in-process MemoryBroker and the real-Redis RedisBroker.

Redis-only behaviour (re-delivery of a dead consumer's tasks, the delivery limit, key TTLs, several
API replicas sharing single-flight) follows the shared tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dvreward_protocol.schemas import WorkerInfo
from server.errors import ErrorCode, ServiceError
from server.queue.base import Result, Task, TaskKind
from server.queue.memory import MemoryBroker
from server.queue.redis_broker import RedisBroker

PREFIX = "t"
MakeBroker = Callable[..., Any]


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    if request.param == "memory":
        return "memory", None
    return "redis", request.getfixturevalue("redis_url")


@pytest.fixture
async def make_broker(backend: tuple[str, str | None]) -> AsyncIterator[MakeBroker]:
    kind, url = backend
    made: list[Any] = []

    def make(max_queue: int = 100, visibility_timeout: float = 60.0, max_deliveries: int = 3,
             consumer: str | None = None) -> Any:
        if url is None:
            broker: Any = MemoryBroker(max_queue=max_queue, result_ttl=60)
        else:
            broker = RedisBroker(url, prefix=PREFIX, max_queue=max_queue, result_ttl=60,
                                 visibility_timeout=visibility_timeout, max_deliveries=max_deliveries,
                                 consumer=consumer)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        await broker.close()


def reply_key(request_id: str) -> str:
    return f"{PREFIX}:reply:{request_id}"


def make_task(task_id: str, reply_to: str, kind: TaskKind = TaskKind.verify, *, ttl: float = 30.0,
              payload: dict[str, Any] | None = None, blobs: list[bytes] | None = None) -> Task:
    return Task(task_id, kind, reply_to, time.time() + ttl, payload if payload is not None else {"questions": ["q?"]},
                blobs or [])


async def claim_n(broker: Any, kind: TaskKind, n: int, timeout: float = 5.0) -> list[Task]:
    """Claim until n tasks arrived (brokers may hand them out over several calls)."""
    got: list[Task] = []
    end = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < end:
        got.extend(await broker.claim(kind, n - len(got), 0.2))
    assert len(got) == n, f"claimed {len(got)} of {n} tasks"
    return got


async def queued_replies(broker: Any, reply_to: str) -> int:
    """How many results wait in a reply queue (a white-box probe: the only one in the shared tests)."""
    if isinstance(broker, MemoryBroker):
        q = broker._replies.get(reply_to)
        return q.qsize() if q is not None else 0
    return int(await broker.redis.llen(broker.keys.reply(reply_to)))


def worker_info(worker_id: str, heartbeat_at: float = 1.0) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, verifier="tiny-v", decomposer=None, pipeline=None, template_version="tv",
                      capacity=4, started_at=1.0, heartbeat_at=heartbeat_at)


# ---- shared contract ---------------------------------------------------------------------------
async def test_round_trip_keeps_header_payload_and_blob_bytes(make_broker: MakeBroker) -> None:
    broker = make_broker()
    reply = reply_key("r1")
    blobs0 = [bytes(range(256)) * 3, b"\x89PNG\r\n\x1a\n\x00\x00", b"\x00"]
    t0 = make_task("r1:v0", reply, payload={"questions": ["Is it red?", "Ünïcode — ok?"]}, blobs=blobs0)
    t1 = make_task("r1:v1", reply, payload={"questions": ["Is it blue?"]}, blobs=[b"\xff" * 1000])
    dec = make_task("r1:dec", reply, TaskKind.decompose, payload={"prompt": "a red cat"})
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
    assert got_dec.payload == {"prompt": "a red cat"} and got_dec.blobs == []

    await broker.complete(claimed["r1:v0"], Result("r1:v0", {"p": [0.25, 0.75]}))
    await broker.complete(claimed["r1:v1"], Result.failure("r1:v1", ErrorCode.bad_image, "not an image"))
    await broker.complete(got_dec, Result("r1:dec", {"questions": []}))
    results = await broker.gather(reply, {"r1:v0", "r1:v1", "r1:dec"}, time.time() + 5)
    assert results["r1:v0"].data == {"p": [0.25, 0.75]} and results["r1:v0"].error_code is None
    assert results["r1:v1"].error_code is ErrorCode.bad_image and results["r1:v1"].error == "not an image"
    assert results["r1:dec"].data == {"questions": []}
    assert await broker.queue_depth(TaskKind.verify) == 0


async def test_claim_on_an_empty_queue_returns_nothing(make_broker: MakeBroker) -> None:
    broker = make_broker()
    assert await broker.claim(TaskKind.verify, 4, 0.05) == []


async def test_gather_times_out_with_timeout_error(make_broker: MakeBroker) -> None:
    broker = make_broker()
    reply = reply_key("r2")
    await broker.submit([make_task("r2:v0", reply), make_task("r2:v1", reply)])
    (first, *_) = await claim_n(broker, TaskKind.verify, 2)
    await broker.complete(first, Result(first.task_id, {"p": [0.5]}))
    with pytest.raises(ServiceError) as err:
        await broker.gather(reply, {"r2:v0", "r2:v1"}, time.time() + 0.3)
    assert err.value.code is ErrorCode.timeout and err.value.status == 504
    assert "1 of 2" in err.value.message


async def test_bounded_queue_refuses_with_rate_limited_and_retry_after(make_broker: MakeBroker) -> None:
    broker = make_broker(max_queue=3)
    reply = reply_key("r3")
    await broker.submit([make_task(f"r3:v{i}", reply) for i in range(2)])
    with pytest.raises(ServiceError) as err:
        await broker.submit([make_task(f"r3:w{i}", reply) for i in range(2)])
    assert err.value.code is ErrorCode.rate_limited and err.value.status == 429
    assert err.value.retry_after is not None and err.value.retry_after > 0
    assert "verify" in err.value.message
    assert await broker.queue_depth(TaskKind.verify) == 2, "a refused submit must enqueue nothing"
    await broker.submit([make_task("r3:v2", reply)])  # exactly at the bound is fine
    await broker.submit([make_task("r3:d0", reply, TaskKind.decompose, payload={"prompt": "p"})])  # other queue
    assert await broker.queue_depth(TaskKind.verify) == 3
    assert await broker.queue_depth(TaskKind.decompose) == 1


async def test_more_tasks_than_the_queue_holds_is_413_not_a_429_forever(make_broker: MakeBroker) -> None:
    broker = make_broker(max_queue=3)
    with pytest.raises(ServiceError) as err:
        await broker.submit([make_task(f"big:v{i}", reply_key("big")) for i in range(4)])
    assert err.value.code is ErrorCode.too_large and err.value.status == 413
    assert "4" in err.value.message and "3" in err.value.message and err.value.retry_after is None
    assert await broker.queue_depth(TaskKind.verify) == 0


async def test_admission_is_atomic_under_concurrent_submits(make_broker: MakeBroker) -> None:
    """32 concurrent one-task submits against a bound of 16: exactly 16 get in (XLEN-then-XADD let 28 in)."""
    first = make_broker(max_queue=16)
    # Redis: several clients, as several API replicas; the in-process queue exists once per process.
    brokers = [first] + [first if isinstance(first, MemoryBroker) else make_broker(max_queue=16) for _ in range(3)]
    outcomes = await asyncio.gather(*(brokers[i % 4].submit([make_task(f"c:v{i}", reply_key("c"))])
                                      for i in range(32)), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, ServiceError)]
    assert all(o.code is ErrorCode.rate_limited for o in refused)
    assert len(refused) == 16 and outcomes.count(None) == 16
    assert await brokers[0].queue_depth(TaskKind.verify) == 16


async def test_claimed_tasks_count_against_the_bound_until_completed(make_broker: MakeBroker) -> None:
    """Both brokers count the same thing: queued plus claimed-but-not-completed tasks."""
    broker = make_broker(max_queue=2)
    await broker.submit([make_task("k:v0", reply_key("k")), make_task("k:v1", reply_key("k"))])
    t0, _ = await claim_n(broker, TaskKind.verify, 2)
    assert await broker.queue_depth(TaskKind.verify) == 2
    with pytest.raises(ServiceError) as err:
        await broker.submit([make_task("k:v2", reply_key("k"))])
    assert err.value.code is ErrorCode.rate_limited
    await broker.complete(t0, Result(t0.task_id, {"p": [0.5]}))
    assert await broker.queue_depth(TaskKind.verify) == 1
    await broker.submit([make_task("k:v2", reply_key("k"))])


async def test_completing_a_task_twice_delivers_one_result(make_broker: MakeBroker) -> None:
    broker = make_broker()
    reply = reply_key("r4")
    await broker.submit([make_task("r4:v0", reply), make_task("r4:v1", reply)])
    t0, t1 = sorted(await claim_n(broker, TaskKind.verify, 2), key=lambda t: t.task_id)
    await broker.complete(t0, Result(t0.task_id, {"p": [0.1]}))
    await broker.complete(t0, Result(t0.task_id, {"p": [0.9]}))  # e.g. a re-delivered copy finishing late
    assert await queued_replies(broker, reply) == 1
    await broker.complete(t1, Result(t1.task_id, {"p": [0.2]}))
    assert await queued_replies(broker, reply) == 2
    got = await broker.gather(reply, {t0.task_id, t1.task_id}, time.time() + 5)
    assert got[t0.task_id].data == {"p": [0.1]}, "the first result wins"


async def test_singleflight_computes_once_for_concurrent_callers(make_broker: MakeBroker) -> None:
    broker = make_broker()
    calls = 0

    async def compute() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)
        return b'{"value": 42}'

    deadline = time.time() + 10
    out = await asyncio.gather(*(broker.singleflight("k1", compute, 60, deadline) for _ in range(5)))
    assert calls == 1
    assert [v for v, _ in out] == [b'{"value": 42}'] * 5
    assert sorted(c for _, c in out) == [False, True, True, True, True], "exactly one caller computed"
    value, cached = await broker.singleflight("k1", compute, 60, deadline)
    assert (value, cached, calls) == (b'{"value": 42}', True, 1)
    other, cached = await broker.singleflight("k2", compute, 60, deadline)
    assert (other, cached, calls) == (b'{"value": 42}', False, 2), "another key computes anew"


async def test_singleflight_failure_reaches_every_waiter_and_is_not_cached(make_broker: MakeBroker) -> None:
    broker = make_broker()
    calls = 0

    async def failing() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)
        raise ServiceError(ErrorCode.decomposition_failed, "the decomposer wrote no JSON")

    deadline = time.time() + 10
    out = await asyncio.gather(*(broker.singleflight("k", failing, 60, deadline) for _ in range(5)),
                               return_exceptions=True)
    assert calls == 1
    for exc in out:
        assert isinstance(exc, ServiceError), exc
        assert exc.code is ErrorCode.decomposition_failed and "no JSON" in exc.message

    async def works() -> bytes:
        nonlocal calls
        calls += 1
        return b"ok"

    assert await broker.singleflight("k", works, 60, deadline) == (b"ok", False)
    assert calls == 2, "a failure must not be cached"


async def test_singleflight_unexpected_exception_does_not_strand_waiters(make_broker: MakeBroker) -> None:
    broker = make_broker()

    async def crashing() -> bytes:
        await asyncio.sleep(0.3)
        raise RuntimeError("bug in compute")

    deadline = time.time() + 4  # a stranded waiter would end in a timeout error at this deadline
    out = await asyncio.gather(*(broker.singleflight("crash", crashing, 60, deadline) for _ in range(3)),
                               return_exceptions=True)
    assert sum(isinstance(e, RuntimeError) for e in out) >= 1, out
    for exc in out:
        assert isinstance(exc, RuntimeError | ServiceError), exc
        assert not (isinstance(exc, ServiceError) and exc.code is ErrorCode.timeout), f"waiter stranded: {exc}"

    async def works() -> bytes:
        return b"fine"

    assert await broker.singleflight("crash", works, 60, time.time() + 4) == (b"fine", False)


async def test_singleflight_cancelled_compute_releases_waiters(make_broker: MakeBroker) -> None:
    """The computing request is cancelled (its client went away): waiters hear at once, and can recompute."""
    broker = make_broker()
    started = asyncio.Event()

    async def slow() -> bytes:
        started.set()
        await asyncio.sleep(30)
        return b"never"

    owner = asyncio.create_task(broker.singleflight("cancel", slow, 60, time.time() + 20))
    await asyncio.wait_for(started.wait(), 5)

    async def unused() -> bytes:
        raise AssertionError("a waiter must not compute while the owner holds the key")

    waiter = asyncio.create_task(broker.singleflight("cancel", unused, 60, time.time() + 20))
    await asyncio.sleep(0.3)  # the waiter is registered and blocked
    owner.cancel()
    t0 = time.monotonic()
    with pytest.raises(ServiceError) as err:
        await asyncio.wait_for(waiter, 10)
    assert err.value.code is ErrorCode.unavailable and "cancelled" in err.value.message
    assert time.monotonic() - t0 < 5, "the waiter must not sit until its deadline"

    async def works() -> bytes:
        return b"fine"

    assert await broker.singleflight("cancel", works, 60, time.time() + 5) == (b"fine", False)


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


async def test_silent_worker_disappears_after_its_ttl(make_broker: MakeBroker) -> None:
    broker = make_broker()
    await broker.heartbeat(worker_info("short"), ttl=1)
    assert [w.worker_id for w in await broker.workers()] == ["short"]
    end = time.monotonic() + 5
    while await broker.workers() and time.monotonic() < end:
        await asyncio.sleep(0.1)
    assert await broker.workers() == [], "a worker that stops beating must drop out"


async def test_expired_tasks_are_claimed_flagged_expired(make_broker: MakeBroker) -> None:
    broker = make_broker()
    reply = reply_key("r5")
    await broker.submit([make_task("r5:old", reply, ttl=-1.0), make_task("r5:new", reply)])
    got = {t.task_id: t for t in await claim_n(broker, TaskKind.verify, 2)}
    assert got["r5:old"].expired and not got["r5:new"].expired


async def test_ping(make_broker: MakeBroker) -> None:
    await make_broker().ping()


# ---- Redis only --------------------------------------------------------------------------------
@pytest.fixture
async def redis_brokers(redis_url: str) -> AsyncIterator[Callable[..., RedisBroker]]:
    made: list[RedisBroker] = []

    def make(consumer: str, visibility_timeout: float = 0.3, max_deliveries: int = 3) -> RedisBroker:
        b = RedisBroker(redis_url, prefix=PREFIX, result_ttl=60, visibility_timeout=visibility_timeout,
                        max_deliveries=max_deliveries, consumer=consumer)
        made.append(b)
        return b

    yield make
    for b in made:
        await b.close()


async def test_redis_redelivers_a_dead_consumers_task_via_xautoclaim(
    redis_brokers: Callable[..., RedisBroker],
) -> None:
    api, dead, alive = redis_brokers("api"), redis_brokers("dead"), redis_brokers("alive")
    reply = reply_key("r6")
    await api.submit([make_task("r6:v0", reply, blobs=[b"img-bytes"])])
    (lost,) = await claim_n(dead, TaskKind.verify, 1)  # claimed, never completed: the worker "died"
    assert lost.delivery == 1
    assert await alive.claim(TaskKind.verify, 4, 0.05) == [], "not re-delivered before the visibility timeout"

    again: list[Task] = []
    end = time.monotonic() + 5
    while not again and time.monotonic() < end:
        again = await alive.claim(TaskKind.verify, 4, 0.1)
    assert [t.task_id for t in again] == ["r6:v0"]
    assert again[0].delivery == 2 and again[0].blobs == [b"img-bytes"]
    pending = await alive.redis.xpending(alive.keys.stream(TaskKind.verify), "workers")
    assert {c["name"]: c["pending"] for c in pending["consumers"]} == {b"alive": 1}

    await alive.complete(again[0], Result("r6:v0", {"p": [0.3]}))
    got = await api.gather(reply, {"r6:v0"}, time.time() + 5)
    assert got["r6:v0"].data == {"p": [0.3]}
    await dead.complete(lost, Result("r6:v0", {"p": [0.9]}))  # the zombie finishes late
    assert await api.redis.llen(reply) == 0, "a late duplicate must not deliver a second result"
    assert await api.redis.xlen(api.keys.stream(TaskKind.verify)) == 0


async def test_redis_delivery_limit_fails_the_task_with_a_clear_error(
    redis_brokers: Callable[..., RedisBroker],
) -> None:
    api = redis_brokers("api", max_deliveries=2)
    reply = reply_key("r7")
    await api.submit([make_task("r7:v0", reply)])
    deliveries = []
    for n in range(2):  # two consumers in turn claim it and die
        crashed = redis_brokers(f"crash{n}", max_deliveries=2)
        got: list[Task] = []
        end = time.monotonic() + 5
        while not got and time.monotonic() < end:
            got = await crashed.claim(TaskKind.verify, 1, 0.1)
        assert [t.task_id for t in got] == ["r7:v0"]
        deliveries.append(got[0].delivery)
    assert deliveries == [1, 2]

    third = redis_brokers("third", max_deliveries=2)
    end = time.monotonic() + 5
    while await api.redis.llen(reply) == 0 and time.monotonic() < end:
        assert await third.claim(TaskKind.verify, 1, 0.1) == [], "a task past its delivery limit is not handed out"
    result = (await api.gather(reply, {"r7:v0"}, time.time() + 2))["r7:v0"]
    assert result.error_code is ErrorCode.delivery_limit
    assert result.error is not None and "delivered 2 times" in result.error
    stream = api.keys.stream(TaskKind.verify)
    assert await api.redis.xlen(stream) == 0
    assert (await api.redis.xpending(stream, "workers"))["pending"] == 0


async def test_redis_every_key_has_a_ttl(redis_brokers: Callable[..., RedisBroker]) -> None:
    broker = redis_brokers("w")
    reply = reply_key("r8")
    await broker.submit([make_task("r8:v0", reply), make_task("r8:v1", reply)])
    t0, t1 = await claim_n(broker, TaskKind.verify, 2)
    await broker.complete(t0, Result(t0.task_id, {"p": [0.5]}))  # t1's result stays undelivered
    await broker.heartbeat(worker_info("w"), ttl=30)

    async def value() -> bytes:
        return b"v"

    await broker.singleflight("cached", value, 60, time.time() + 5)
    keys = [k.decode() async for k in broker.redis.scan_iter(match=f"{PREFIX}:*")]
    assert any(":done:" in k for k in keys) and any(":reply:" in k for k in keys)
    assert any(":sf:value:" in k for k in keys) and f"{PREFIX}:workers" in keys and any(":stream:" in k for k in keys)
    no_ttl = [k for k in keys if await broker.redis.ttl(k) < 0]
    assert no_ttl == [], f"keys without a TTL: {no_ttl}"


async def test_redis_streams_are_trimmed_past_the_tasks_deadlines(redis_url: str) -> None:
    """Workers down: timed-out tasks (and their image bytes) leave the stream instead of filling Redis."""
    broker = RedisBroker(redis_url, prefix=PREFIX, max_queue=3, result_ttl=60, max_task_age=0.5)
    try:
        await broker.submit([make_task(f"old:v{i}", reply_key("old"), blobs=[b"x" * 100_000]) for i in range(3)])
        with pytest.raises(ServiceError) as err:
            await broker.submit([make_task("new:v0", reply_key("new"))])
        assert err.value.code is ErrorCode.rate_limited
        await asyncio.sleep(0.6)
        await broker.submit([make_task("new:v0", reply_key("new"))])  # the three old ones are past any deadline
        stream = broker.keys.stream(TaskKind.verify)
        assert await broker.redis.xlen(stream) == 1
        assert 0 < await broker.redis.pttl(stream) <= 500, "an idle stream expires with its last task"
        (task,) = await claim_n(broker, TaskKind.verify, 1)
        assert task.task_id == "new:v0"
    finally:
        await broker.close()


async def test_redis_singleflight_across_api_replicas(redis_brokers: Callable[..., RedisBroker]) -> None:
    replicas = [redis_brokers(f"api{i}") for i in range(3)]
    calls = 0

    async def compute() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)
        return b"shared"

    deadline = time.time() + 10
    out = await asyncio.gather(*(r.singleflight("x", compute, 60, deadline) for r in replicas for _ in range(2)))
    assert calls == 1 and {v for v, _ in out} == {b"shared"}


async def test_redis_claim_recovers_when_the_consumer_group_is_lost(
    redis_brokers: Callable[..., RedisBroker],
) -> None:
    """A Redis restarted without persistence (or flushed) loses the group; workers must not crash on NOGROUP."""
    api, worker = redis_brokers("api"), redis_brokers("w")
    await api.submit([make_task("r9:v0", reply_key("r9"))])
    (before,) = await claim_n(worker, TaskKind.verify, 1)
    await api.redis.flushall()
    await worker.complete(before, Result(before.task_id, {"p": [0.5]}))  # finishing across the loss is fine
    await api.submit([make_task("r9:v1", reply_key("r9"))])  # stream re-created, group not
    (task,) = await claim_n(worker, TaskKind.verify, 1)
    assert task.task_id == "r9:v1"


async def test_redis_waits_longer_than_the_socket_timeout_are_not_outages(
    redis_brokers: Callable[..., RedisBroker],
) -> None:
    """A result or a single-flight value that takes longer than redis-py's 5 s default socket timeout."""
    api, worker = redis_brokers("api"), redis_brokers("w")
    reply = reply_key("r10")
    await api.submit([make_task("r10:v0", reply)])
    (task,) = await claim_n(worker, TaskKind.verify, 1)

    async def slow_worker() -> None:
        await asyncio.sleep(5.5)
        await worker.complete(task, Result(task.task_id, {"p": [0.4]}))

    async def slow_compute() -> bytes:
        await asyncio.sleep(5.5)
        return b"slow"

    deadline = time.time() + 20
    results, leader, waiter, _ = await asyncio.gather(
        api.gather(reply, {"r10:v0"}, deadline),
        worker.singleflight("slow", slow_compute, 60, deadline),
        api.singleflight("slow", slow_compute, 60, deadline),
        slow_worker(),
    )
    assert results["r10:v0"].data == {"p": [0.4]}
    assert sorted([leader, waiter]) == [(b"slow", False), (b"slow", True)]


async def test_redis_extend_keeps_a_long_task_from_being_reclaimed(
    redis_brokers: Callable[..., RedisBroker],
) -> None:
    api, busy, other = redis_brokers("api"), redis_brokers("busy", visibility_timeout=0.5), redis_brokers("other")
    await api.submit([make_task("r9:v0", reply_key("r9"))])
    (task,) = await claim_n(busy, TaskKind.verify, 1)
    end = time.monotonic() + 1.5  # three visibility timeouts of work, with the claim renewed
    while time.monotonic() < end:
        await asyncio.sleep(0.2)
        await busy.extend([task])
        assert await other.claim(TaskKind.verify, 1, 0.01) == [], "a renewed task must not be re-delivered"
    await asyncio.sleep(0.6)  # renewal stops (the worker died): now it is re-delivered
    again = await claim_n(other, TaskKind.verify, 1)
    assert again[0].task_id == "r9:v0" and again[0].delivery == 2
