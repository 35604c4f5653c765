"""A Redis that refuses commands (memory full, a replica after a failover, an aborted transaction, a dataset loading)
is a 503 the API passes on and workers retry, never a 500 or an exception that ends a worker loop. redis-py drops
the code from the text of these errors (an OutOfMemoryError reads "command not allowed when used memory >
'maxmemory'"), so they are mapped by class; the real refusals are provoked on a private redis-server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis
from redis.exceptions import (
    BusyLoadingError,
    ExecAbortError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)

from dvreward_protocol.schemas import WorkerInfo
from server.errors import ErrorCode, ServiceError
from server.queue import base
from server.queue.messages import Result, Task, TaskKind, VerifyPayload
from server.queue.redis_broker import RedisBroker
from server.queue.redis_errors import error_code, unavailable
from server.runtime import build_broker
from server.settings import Settings
from tests.service_stack import RedisProcess, drop_service_settings, free_port


@pytest.mark.parametrize("exc", [
    OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    ReadOnlyError("You can't write against a read only replica."),
    ExecAbortError("Transaction discarded because of previous errors."),
    BusyLoadingError("Redis is loading the dataset in memory"),
    OutOfMemoryError("Command # 1 (HSET dvr:workers w {...}) of pipeline caused error: command not allowed when "
                     "used memory > 'maxmemory'."),
    ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist"),
    ResponseError("Command # 2 (SET k v) of pipeline caused error: BUSY Redis is busy running a script."),
], ids=lambda e: type(e).__name__)
def test_refusals_are_503_by_class_or_code(exc: Exception) -> None:
    err = unavailable(exc)
    assert err is not None, f"{type(exc).__name__}: {exc} was not read as a refusal"
    assert err.code is ErrorCode.unavailable and err.status == 503
    assert err.retry_after is not None and err.retry_after >= 1
    assert err.message.startswith("the queue (Redis) cannot serve requests now: it ")


def test_faults_are_not_read_as_outages() -> None:
    wrong_type = ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
    assert unavailable(wrong_type) is None, "a fault of this code must stay a 500, not a 503 to retry forever"
    assert error_code(wrong_type) == "WRONGTYPE"
    assert error_code(ResponseError("UNBLOCKED the stream key no longer exists")) == "UNBLOCKED"
    assert error_code(ResponseError("Command # 1 (XACK s g 1-0) of pipeline caused error: NOGROUP No such key")
                      ) == "NOGROUP"


@pytest.fixture
async def brokers(private_redis: RedisProcess, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[RedisBroker]]:
    """An API's and a worker's broker on a Redis of this test alone, which it may make refuse writes."""
    drop_service_settings(monkeypatch)
    made = []
    for name in ("api", "w"):
        broker = build_broker(Settings(redis_url=private_redis.url, redis_timeout_s=2.0), name)
        assert isinstance(broker, RedisBroker)
        made.append(broker)
    yield made
    for b in made:
        await b.close()


def task(task_id: str) -> Task:
    return Task(task_id, "r", time.time() + 60, VerifyPayload(questions=("q?",)), [b"img"])


def info() -> WorkerInfo:
    return WorkerInfo(worker_id="w", verifier="v", decomposer=None, pipeline=None, template_version="t", capacity=1,
                      started_at=1.0, heartbeat_at=1.0)


async def value() -> bytes:
    return b"v"


def every_call(api: RedisBroker, worker: RedisBroker, claimed: Task) -> dict[str, Callable[[], Awaitable[Any]]]:
    """One call of each kind that writes, from either side."""
    return {
        "submit": lambda: api.submit([task("r:v1")]),
        "singleflight": lambda: base.singleflight(api, "k", value, 60, time.time() + 10),
        "heartbeat": lambda: worker.heartbeat(info(), 30),
        "complete": lambda: worker.complete([(claimed, Result.failure(claimed.task_id, ErrorCode.bad_image, "x"))]),
        "claim": lambda: worker.claim(TaskKind.verify, 4, 0.05),
    }


async def refused_then_served(brokers: list[RedisBroker], refuse: Callable[[], None], allow: Callable[[], None],
                              reason: str) -> set[str]:
    """Every call while Redis refuses writes is served or a 503 saying why (the calls refused are returned), and every
    call is served once it takes them again."""
    api, worker = brokers
    await api.submit([task("r:v0"), task("r:v2")])
    (claimed, _) = await worker.claim(TaskKind.verify, 2, 1.0)
    refused = set()
    refuse()
    try:
        for name, call in every_call(api, worker, claimed).items():
            try:
                await call()
            except ServiceError as err:
                assert err.code is ErrorCode.unavailable and reason in err.message, (name, err.message)
                refused.add(name)
    finally:
        allow()
    for call in every_call(api, worker, claimed).values():
        await call()
    return refused


async def test_a_redis_out_of_memory_is_a_503_until_it_has_room(
    brokers: list[RedisBroker], private_redis: RedisProcess,
) -> None:
    admin = redis.Redis.from_url(private_redis.url)
    admin.config_set("maxmemory-policy", "noeviction")
    try:
        refused = await refused_then_served(brokers, lambda: admin.config_set("maxmemory", 1),
                                            lambda: admin.config_set("maxmemory", 0), "out of memory")
    finally:
        admin.close()
    # Admission too (its script trims before it adds, and Redis lets a script that has written write on, unless
    # it is declared); a claim reads and needs no memory.
    assert refused == {"submit", "singleflight", "heartbeat", "complete"}


async def test_a_read_only_replica_is_a_503_until_promoted(
    brokers: list[RedisBroker], private_redis: RedisProcess,
) -> None:
    """A failover leaves clients on a replica: it refuses writes (READONLY) until promoted. Here its master never
    answers, so it keeps its data and stays read-only until REPLICAOF NO ONE."""
    admin = redis.Redis.from_url(private_redis.url)
    try:
        refused = await refused_then_served(brokers, lambda: admin.replicaof("127.0.0.1", free_port()),
                                            lambda: admin.replicaof("NO", "ONE"), "read-only")
    finally:
        admin.close()
    assert refused == {"submit", "singleflight", "heartbeat", "complete", "claim"}  # a claim writes its group


async def test_tasks_a_refused_claim_had_read_are_handed_out_at_the_next_claim(
    brokers: list[RedisBroker], private_redis: RedisProcess,
) -> None:
    """Redis hands the entries out, then refuses the write that settles one of them (an entry no worker can read):
    the claim fails, and the next one gets the others at once, not after the visibility timeout (60 s), past their
    requests' deadlines, and counts them delivered once. First deliveries alone need no write: a Redis out of memory
    still hands them out."""
    api, worker = brokers
    assert await worker.claim(TaskKind.verify, 4, 0.05) == []  # its group is made: the next claim reads at once
    await api.submit([task("r:v0"), task("r:v1")])
    await api.redis.xadd(api.keys.stream(TaskKind.verify), {"task": b"{written by another version"})
    await api.submit([task("r:v2")])
    admin = redis.Redis.from_url(private_redis.url)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    try:
        with pytest.raises(ServiceError) as err:
            await worker.claim(TaskKind.verify, 4, 0.05)
        assert "out of memory" in err.value.message
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
    got = await worker.claim(TaskKind.verify, 4, 0.05)
    assert sorted(t.task_id for t in got) == ["r:v0", "r:v1", "r:v2"] and {t.delivery for t in got} == {1}
    assert await worker.claim(TaskKind.verify, 4, 0.05) == [], "handed out once"
    assert await api.redis.xlen(api.keys.stream(TaskKind.verify)) == 3, "the unreadable entry left the stream"


async def test_a_redis_out_of_memory_still_hands_out_first_deliveries(
    brokers: list[RedisBroker], private_redis: RedisProcess,
) -> None:
    """Claiming new tasks writes nothing but the consumer group's own bookkeeping, so workers keep draining the queue
    while Redis refuses writes; completing them waits until it accepts writes again (and is then delivered once)."""
    api, worker = brokers
    assert await worker.claim(TaskKind.verify, 4, 0.05) == []
    await api.submit([task("m:v0")])
    admin = redis.Redis.from_url(private_redis.url)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    try:
        (got,) = await worker.claim(TaskKind.verify, 4, 0.05)
        with pytest.raises(ServiceError) as err:
            await worker.complete([(got, Result.failure(got.task_id, ErrorCode.bad_image, "x"))])
        assert "out of memory" in err.value.message
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
    await worker.complete([(got, Result.failure(got.task_id, ErrorCode.bad_image, "x"))])
    results = await api.gather("r", {"m:v0"}, time.time() + 10)
    assert results["m:v0"].error is not None and results["m:v0"].error.code is ErrorCode.bad_image
