"""Workers under failure: expired and undecodable tasks in-process, then real processes over real Redis
where one worker is SIGKILLed mid-batch (its tasks are reclaimed by the survivor) and one is SIGTERMed."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import types
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from server.engines.base import ItemScores
from server.errors import ErrorCode
from server.queue.memory import MemoryBroker
from server.queue.messages import Failure, Result, Task, TaskKind, Verified, VerifyPayload
from server.runtime import build_broker
from server.settings import Settings
from server.worker import Worker
from tests.tolerance import P_TOL, assert_rewards_close

QUESTIONS = ["Is there a cat?", "Is the cat red?"]


def ask(questions: list[str]) -> VerifyPayload:
    return VerifyPayload(questions=tuple(questions))


def p_of(result: Result) -> tuple[float, ...]:
    assert isinstance(result.value, Verified), result
    return result.value.p


def failure(result: Result) -> Failure:
    assert result.value is None and result.error is not None, result
    return result.error


# ---- in-process worker on both brokers ---------------------------------------------------------
@pytest.fixture(params=["memory", "redis"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    url = None if request.param == "memory" else request.getfixturevalue("redis_url")
    b = build_broker(Settings(redis_url=url, queue_prefix="wr"))
    yield b
    await b.close()


async def run_worker(broker: Any, verifier: Any, body: Callable[[Worker], Any]) -> Worker:
    worker = Worker(broker, verifier, None, template_version="test", batch_size=8, batch_wait=0.05,
                    heartbeat_s=0.5, batch_timeout_s=600, max_image_pixels=4096 * 4096, worker_id="w-inproc")
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await body(worker)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)
    return worker


async def test_worker_fails_expired_and_undecodable_tasks_alone(
    broker: Any, tiny_verifier: Any, kit: types.SimpleNamespace,
) -> None:
    good = [kit.png_bytes(1), kit.png_bytes(2)]
    whole = kit.png_bytes(3, (64, 64))
    reply = "req"
    now = time.time()
    tasks = [
        Task("req:ok0", reply, now + 30, ask(QUESTIONS), [good[0]]),
        Task("req:old", reply, now - 1, ask(QUESTIONS), [good[0]]),
        Task("req:bad", reply, now + 30, ask(QUESTIONS), [whole[: len(whole) // 2]]),
        Task("req:ok1", reply, now + 30, ask(QUESTIONS[:1]), [good[1]]),
    ]
    results: dict[str, Result] = {}

    async def body(worker: Worker) -> None:
        await broker.submit(tasks)
        results.update(await broker.gather(reply, {t.task_id for t in tasks}, time.time() + 30))
        assert [w.worker_id for w in await broker.workers()] == ["w-inproc"]

    await run_worker(broker, tiny_verifier, body)
    assert failure(results["req:old"]).code is ErrorCode.expired
    assert failure(results["req:bad"]).code is ErrorCode.bad_image and failure(results["req:bad"]).message
    expected = [kit.local_p(tiny_verifier, [good[0]], QUESTIONS)[0], kit.local_p(tiny_verifier, [good[1]],
                                                                                  QUESTIONS[:1])[0]]
    for tid, exp in zip(("req:ok0", "req:ok1"), expected, strict=True):
        assert p_of(results[tid]) == pytest.approx(exp, abs=P_TOL)
    assert await broker.workers() == [], "a stopped worker deregisters"
    assert await broker.queue_depth(TaskKind.verify) == 0


async def test_an_item_the_engine_rejects_fails_alone(tiny_verifier: Any, kit: types.SimpleNamespace) -> None:
    """The engine raises for the whole batch; the worker retries item by item and fails only that item."""
    broker = build_broker(Settings(redis_url=None))  # in process
    reply, now = "r:isolate", time.time()
    tasks = [Task(f"i:{n}", reply, now + 30, ask(qs), [kit.png_bytes(n)])
             for n, qs in enumerate([QUESTIONS, [], QUESTIONS[:1]])]  # no questions: the engine refuses it
    results: dict[str, Result] = {}

    async def body(worker: Worker) -> None:
        await broker.submit(tasks)
        results.update(await broker.gather(reply, {t.task_id for t in tasks}, time.time() + 30))

    await run_worker(broker, tiny_verifier, body)
    assert failure(results["i:1"]).code is ErrorCode.verification_failed
    assert "at least one question" in failure(results["i:1"]).message
    assert len(p_of(results["i:0"])) == 2 and len(p_of(results["i:2"])) == 1


class Overconfident:
    """Fault injection: the real engine, with its first item's first p pushed out of [0, 1] (an engine bug)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.model_id, self.system_prompt = inner.model_id, inner.system_prompt

    def verify_each(self, items: Any, greedy: bool = False) -> list[Any]:
        out = self.inner.verify_each(items, greedy=greedy)
        first = out[0]
        out[0] = ItemScores((1.5, *first.p[1:]), first.source)
        return out


async def test_scores_that_are_not_probabilities_fail_their_item_not_the_worker(
    tiny_verifier: Any, kit: types.SimpleNamespace,
) -> None:
    broker = build_broker(Settings(redis_url=None))  # in process
    tasks = [Task(f"o:{n}", "o", time.time() + 30, ask(QUESTIONS), [kit.png_bytes(n)]) for n in range(2)]
    results: dict[str, Result] = {}

    async def body(worker: Worker) -> None:
        await broker.submit(tasks)
        results.update(await broker.gather("o", {t.task_id for t in tasks}, time.time() + 30))

    await run_worker(broker, Overconfident(tiny_verifier), body)
    bad, good = (results[f"o:{n}"] for n in range(2))
    assert failure(bad).code is ErrorCode.verification_failed and "not probabilities" in failure(bad).message
    assert p_of(good) == pytest.approx(kit.local_p(tiny_verifier, [kit.png_bytes(1)], QUESTIONS)[0], abs=P_TOL)


class BrokenDelivery(MemoryBroker):
    """A broker whose result delivery fails with a bug (not an outage): fault injection, not a stand-in."""

    async def complete(self, done: Sequence[tuple[Task, Result]]) -> None:
        raise RuntimeError("delivery bug")


async def test_a_crashed_loop_stops_the_whole_worker(tiny_verifier: Any, kit: types.SimpleNamespace) -> None:
    """No half-alive worker: the heartbeat stops with the crashed loop, and the worker leaves the registry."""
    s = Settings()
    broker = BrokenDelivery(max_queue=s.max_queue, result_ttl=s.result_ttl_s, cache_max_bytes=s.cache_max_bytes)
    worker = Worker(broker, tiny_verifier, None, template_version="test", batch_size=8, batch_wait=0.05,
                    heartbeat_s=0.2, batch_timeout_s=600, max_image_pixels=4096 * 4096, worker_id="w-crash")
    run = asyncio.create_task(worker.run(asyncio.Event()))
    await broker.submit([Task("c:0", "r", time.time() + 30, ask(QUESTIONS),
                              [kit.png_bytes(1)])])
    with pytest.raises(ExceptionGroup) as err:
        await asyncio.wait_for(run, timeout=30)
    assert err.group_contains(RuntimeError, match="delivery bug")
    assert await broker.workers() == []


class MissesItsCancellation(MemoryBroker):
    """Fault injection: the heartbeat fails with a bug, and the claim in progress swallows the cancellation that
    follows, returning instead, as Python 3.11's asyncio.wait_for does when its inner result finished that moment."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.beats = 0
        self.swallowed = 0

    async def heartbeat(self, info: Any, ttl: float) -> None:
        self.beats += 1
        if self.beats > 1:
            raise RuntimeError("heartbeat bug")
        await super().heartbeat(info, ttl)

    async def claim(self, kind: TaskKind, max_n: int, max_wait: float) -> list[Task]:
        try:
            return await super().claim(kind, max_n, max_wait)
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed += 1
            return []


async def test_a_loop_that_misses_its_cancellation_still_ends_with_the_worker(tiny_verifier: Any) -> None:
    """One loop failed and the other survived its cancellation: the worker lived on with no heartbeat (a zombie no
    supervisor restarts). The survivor ends anyway, and the worker ends with the failure."""
    s = Settings()
    broker = MissesItsCancellation(max_queue=s.max_queue, result_ttl=s.result_ttl_s, cache_max_bytes=s.cache_max_bytes)
    worker = Worker(broker, tiny_verifier, None, template_version="test", batch_size=8, batch_wait=0.5,
                    heartbeat_s=0.2, batch_timeout_s=600, max_image_pixels=4096 * 4096, worker_id="w-zombie")
    stop = asyncio.Event()
    run = asyncio.create_task(worker.run(stop))
    done, _ = await asyncio.wait({run}, timeout=20)
    stop.set()  # lets a zombie end, so that the test can
    await asyncio.wait_for(asyncio.gather(run, return_exceptions=True), 30)
    assert done, "the worker lived on after a loop failed"
    assert broker.swallowed == 1, "the claim never missed a cancellation: the fault was not reproduced"
    failed = run.exception()
    assert isinstance(failed, ExceptionGroup) and failed.subgroup(RuntimeError) is not None, failed
    assert await broker.workers() == []


class Hangs:
    """Fault injection: an engine stuck forever (a deadlocked kernel, a hung driver) until released."""

    model_id = "hangs"
    system_prompt = ""

    def __init__(self) -> None:
        self.release = threading.Event()

    def verify_each(self, items: Any, greedy: bool = False) -> list[Any]:
        self.release.wait()
        raise RuntimeError("released at teardown")


async def test_a_hung_engine_makes_the_worker_leave_and_its_tasks_go_to_others(
    redis_url: str, kit: types.SimpleNamespace,
) -> None:
    """Past the batch timeout the worker stops renewing, leaves /readyz's registry and ends with WorkerHung."""
    from server.worker import WorkerHung

    settings = Settings(redis_url=redis_url, queue_prefix="hung", visibility_timeout_s=0.5, heartbeat_s=0.1)
    api, stuck, other = (build_broker(settings, name) for name in ("api", "stuck", "other"))
    engine = Hangs()
    worker = Worker(stuck, engine, None, template_version="test", batch_size=4, batch_wait=0.01, heartbeat_s=0.2,
                    batch_timeout_s=1.0, max_image_pixels=4096 * 4096, worker_id="w-hung")
    try:
        await api.submit([Task("h:0", "r", time.time() + 60, ask(QUESTIONS),
                               [kit.png_bytes(1)])])
        run = asyncio.create_task(worker.run(asyncio.Event()))
        await asyncio.sleep(0.6)
        assert [w.worker_id for w in await api.workers()] == ["w-hung"]
        assert await other.claim(TaskKind.verify, 1, 0.05) == [], "renewed while within the batch timeout"
        t0 = time.monotonic()
        with pytest.raises(ExceptionGroup) as err:
            await asyncio.wait_for(run, timeout=10)
        assert err.group_contains(WorkerHung) and time.monotonic() - t0 < 3
        assert await api.workers() == [], "a hung worker is not listed as ready"
        again: list[Task] = []
        end = time.monotonic() + 5
        while not again and time.monotonic() < end:
            again = await other.claim(TaskKind.verify, 1, 0.1)
        assert [t.task_id for t in again] == ["h:0"] and again[0].delivery == 2, "its claim is no longer renewed"
    finally:
        engine.release.set()
        for b in (api, stuck, other):
            await b.close()


# ---- real processes over real Redis ------------------------------------------------------------
def worker_ids(api_url: str) -> list[str]:
    r = httpx.get(api_url + "/v1/models", timeout=5)
    assert r.status_code == 200, r.text
    return [w["worker_id"] for w in r.json()["workers"]]


def has_pid(ids: list[str], pid: int) -> bool:
    return any(f"-{pid}-" in i for i in ids)  # worker ids are host-pid-random


def pending(client: redis.Redis) -> dict[bytes, int]:
    """Claimed, unacknowledged verify tasks per consumer."""
    try:
        summary = client.xpending("dvr:stream:verify", "workers")
    except redis.ResponseError:  # the group does not exist yet
        return {}
    return {c["name"]: int(c["pending"]) for c in summary["consumers"]}


def stranded_tasks(client: redis.Redis) -> dict[str, int]:
    """Claimed tasks not finished (completing one acknowledges it and delivers its result in one step): task id ->
    how often it was delivered."""
    stream = "dvr:stream:verify"
    try:
        entries = client.xpending_range(stream, "workers", min="-", max="+", count=1000)
    except redis.ResponseError:
        return {}
    out = {}
    for e in entries:
        found = client.xrange(stream, e["message_id"], e["message_id"])
        if found:
            out[json.loads(found[0][1][b"task"])["task_id"]] = int(e["times_delivered"])
    return out


def test_sigkilled_worker_tasks_are_reclaimed_and_sigterm_drains(
    redis_url: str, services: Callable[..., Any], tiny_models: dict[str, Path], tiny_verifier: Any,
    kit: types.SimpleNamespace, request: pytest.FixtureRequest,
) -> None:
    common = dict(redis_url=redis_url, visibility_timeout_s=3, heartbeat_s=0.9, request_timeout_s=90)
    api = services("api", "api", kit.service_env(**common), http=True)
    worker_env = kit.service_env(**common, verifier=tiny_models["verifier"], decomposer="", batch_size=2,
                                 batch_wait_ms=5)
    doomed = services("worker-doomed", "worker", worker_env)
    survivor = services("worker-survivor", "worker", worker_env)
    api.wait_http("/healthz")
    kit.wait_for(lambda: (has_pid(worker_ids(api.url), doomed.pid) and has_pid(worker_ids(api.url), survivor.pid))
                 or not (doomed.alive() and survivor.alive()), kit.STARTUP_S, "both workers to register",
                 interval=0.2)
    assert doomed.alive() and survivor.alive(), doomed.log_tail() + survivor.log_tail()
    api.wait_http("/readyz")

    questions = [{"id": "cat", "text": QUESTIONS[0], "tag": "Existence"},
                 {"id": "red", "text": QUESTIONS[1], "tag": "Attribute", "depends_on": ["cat"]}]
    n_requests, n_images = 6, 4
    seeds = [[100 + 10 * r + i for i in range(n_images)] for r in range(n_requests)]
    images = [[kit.png_bytes(s, (64, 64)) for s in row] for row in seeds]

    def post(r: int) -> httpx.Response:
        body = {"groups": [{"questions": questions, "images": [kit.b64(b) for b in images[r]]}]}
        return httpx.post(api.url + "/v1/score", json=body, headers={"X-Request-Id": f"kill-{r}"}, timeout=120)

    client = redis.Redis.from_url(redis_url)
    request.addfinalizer(client.close)
    survivor.signal(signal.SIGSTOP)  # only the doomed worker claims until it is dead
    try:
        # Let the stopped worker's last blocking read (batch_wait_ms=5) expire in Redis, so no task
        # can be handed to it while it is stopped: every claimed task is then the doomed worker's.
        time.sleep(0.3)
        assert not any(pending(client).values())
        with ThreadPoolExecutor(n_requests) as pool:
            futures = [pool.submit(post, r) for r in range(n_requests)]
            stuck: dict[str, int] = {}
            end = time.monotonic() + 60
            while not stuck:  # freeze the doomed worker until it is caught in the middle of a batch
                assert time.monotonic() < end, "never caught the doomed worker holding a started task"
                kit.wait_for(lambda: any(pending(client).values()), 60, "the doomed worker to claim tasks",
                             interval=0.002)
                doomed.signal(signal.SIGSTOP)
                stuck = stranded_tasks(client)
                if not stuck:
                    doomed.signal(signal.SIGCONT)
            doomed.signal(signal.SIGKILL)
            assert doomed.wait(10) == -signal.SIGKILL
            stranded = pending(client)
            survivor.signal(signal.SIGCONT)
            responses = [f.result(timeout=120) for f in futures]
    finally:
        survivor.signal(signal.SIGCONT)

    held = {name: n for name, n in stranded.items() if n}
    assert len(held) == 1, f"only the doomed worker may hold tasks while the survivor is stopped: {stranded}"
    for r, resp in enumerate(responses):
        assert resp.status_code == 200, resp.text
        (group,) = resp.json()["groups"]
        assert all(x is not None for x in group["rewards"]), group
        expected = kit.local_rewards(tiny_verifier, images[r], questions)
        assert_rewards_close([group["rewards"]], [expected])
    assert set(stuck.values()) == {1}, f"the dead worker held first deliveries: {stuck}"
    assert not any(pending(client).values()) and client.xlen("dvr:stream:verify") == 0, "all re-delivered, completed"

    assert has_pid(worker_ids(api.url), survivor.pid)
    survivor.signal(signal.SIGTERM)
    assert survivor.wait(30) == 0, survivor.log_tail()
    assert not has_pid(worker_ids(api.url), survivor.pid), "a drained worker deregisters"
    assert "Traceback" not in survivor.log_tail(20_000)


def registered_worker(services: Callable[..., Any], kit: types.SimpleNamespace, client: redis.Redis, name: str,
                      **settings: Any) -> Any:
    """`dvreward worker` (the tiny verifier, no decomposer) once it is in the registry."""
    worker = services(name, "worker", kit.service_env(**settings, decomposer=""))
    kit.wait_for(lambda: client.hlen("dvr:workers") or not worker.alive(), kit.STARTUP_S, "the worker to register",
                 interval=0.2)
    assert worker.alive(), worker.log_tail()
    return worker


def test_dvreward_worker_exits_with_status_3_when_a_batch_runs_past_the_batch_timeout(
    services: Callable[..., Any], redis_url: str, tiny_models: dict[str, Path], kit: types.SimpleNamespace,
) -> None:
    """A 1 ms batch timeout makes every batch 'hung': the process must exit (not wait for its engine thread)."""
    client = redis.Redis.from_url(redis_url)
    try:
        worker = registered_worker(services, kit, client, "worker-hung", redis_url=redis_url, heartbeat_s=0.5,
                                   batch_timeout_s=0.001, batch_wait_ms=0, verifier=tiny_models["verifier"])

        async def submit() -> None:
            broker = build_broker(Settings(redis_url=redis_url))
            try:
                await broker.submit([Task("x:0", "x", time.time() + 60, ask(QUESTIONS), [kit.png_bytes(1)])])
            finally:
                await broker.close()

        asyncio.run(submit())
        assert worker.wait(30) == 3, worker.log_tail()
        assert "engine is hung" in worker.log_tail()
        assert client.hlen("dvr:workers") == 0, "the hung worker left the registry before exiting"
    finally:
        client.close()


def test_dvreward_worker_exits_with_status_4_when_a_loop_fails(
    services: Callable[..., Any], redis_url: str, tiny_models: dict[str, Path], kit: types.SimpleNamespace,
) -> None:
    """A fault no retry mends (here the registry key holds another type: WRONGTYPE) ends the loop; the process exits
    non-zero at once for its supervisor to restart it, instead of living on without that loop."""
    client = redis.Redis.from_url(redis_url)
    try:
        worker = registered_worker(services, kit, client, "worker-broken", redis_url=redis_url, heartbeat_s=0.5,
                                   verifier=tiny_models["verifier"])
        with client.pipeline() as pipe:
            pipe.delete("dvr:workers").set("dvr:workers", "not a hash", ex=60).execute()
        assert worker.wait(30) == 4, worker.log_tail()
        assert "stopped because a loop failed" in worker.log_tail() and "WRONGTYPE" in worker.log_tail()
    finally:
        client.close()


def test_sigterm_with_a_batch_in_flight_finishes_it_then_exits(
    redis_url: str, services: Callable[..., Any], tiny_models: dict[str, Path], tiny_verifier: Any,
    kit: types.SimpleNamespace, request: pytest.FixtureRequest,
) -> None:
    """SIGTERM arrives while the worker holds a started batch: the batch is scored and delivered, then it exits 0."""
    common = dict(redis_url=redis_url, heartbeat_s=1, request_timeout_s=90)
    api = services("api", "api", kit.service_env(**common), http=True)
    worker = services("worker", "worker", kit.service_env(**common, verifier=tiny_models["verifier"], decomposer="",
                                                           batch_size=2, batch_wait_ms=5))
    api.wait_http("/readyz")
    questions = [{"id": "cat", "text": QUESTIONS[0], "tag": "Existence"},
                 {"id": "red", "text": QUESTIONS[1], "tag": "Attribute", "depends_on": ["cat"]}]
    image = kit.png_bytes(300, (64, 64))
    body = {"groups": [{"questions": questions, "images": [kit.b64(image)]}]}  # one task: one batch holds it
    client = redis.Redis.from_url(redis_url)
    request.addfinalizer(client.close)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(httpx.post, api.url + "/v1/score", json=body, timeout=120)
        stuck: dict[str, int] = {}
        end = time.monotonic() + 60
        while not stuck:  # freeze the worker until it is caught in the middle of the batch
            assert time.monotonic() < end, "never caught the worker holding a started task"
            kit.wait_for(lambda: any(pending(client).values()), 60, "the worker to claim the task", interval=0.002)
            worker.signal(signal.SIGSTOP)
            stuck = stranded_tasks(client)
            if not stuck:
                worker.signal(signal.SIGCONT)
        worker.signal(signal.SIGTERM)  # handled once it runs again, with the batch in hand
        worker.signal(signal.SIGCONT)
        response = future.result(timeout=120)
    assert worker.wait(60) == 0, worker.log_tail()
    assert response.status_code == 200, response.text
    (reward,) = response.json()["groups"][0]["rewards"]
    assert_rewards_close([[reward]], [kit.local_rewards(tiny_verifier, [image], questions)])
    assert set(stuck.values()) == {1}, "caught in its first delivery"
    assert not any(pending(client).values()) and not has_pid(worker_ids(api.url), worker.pid), \
        "finished by the stopping worker, not left to re-delivery"
    assert "Traceback" not in worker.log_tail(20_000)


def test_sigterm_while_redis_is_frozen_after_a_claim_ends_within_the_batch_timeout(
    private_redis: Any, services: Callable[..., Any], tiny_models: dict[str, Path], kit: types.SimpleNamespace,
    request: pytest.FixtureRequest,
) -> None:
    """Redis freezes once the worker holds a batch: stopping may not cost one Redis timeout per undelivered
    result (32 here), and what was not delivered stays pending for re-delivery."""
    n, batch_timeout_s = 32, 20.0
    env = kit.service_env(redis_url=private_redis.url, verifier=tiny_models["verifier"], decomposer="", batch_size=n,
                          redis_timeout_s=1, heartbeat_s=0.5, batch_timeout_s=batch_timeout_s)
    worker = services("worker", "worker", env)
    client = redis.Redis.from_url(private_redis.url, socket_timeout=10)
    request.addfinalizer(client.close)
    kit.wait_for(lambda: client.hlen("dvr:workers") or not worker.alive(), kit.STARTUP_S, "the worker to register",
                 interval=0.2)
    assert worker.alive(), worker.log_tail()

    async def submit() -> None:
        broker = build_broker(Settings(redis_url=private_redis.url))
        try:
            await broker.submit([Task(f"f:{i}", "f", time.time() + 600, ask(QUESTIONS),
                                      [kit.png_bytes(i, (128, 128))]) for i in range(n)])
        finally:
            await broker.close()

    worker.signal(signal.SIGSTOP)  # all tasks wait in the stream, so that one claim takes them all
    asyncio.run(submit())
    worker.signal(signal.SIGCONT)
    kit.wait_for(lambda: len(stranded_tasks(client)) == n, 60, "the worker to start the whole batch", interval=0.002)
    assert private_redis.proc is not None
    private_redis.proc.send_signal(signal.SIGSTOP)
    try:
        worker.signal(signal.SIGTERM)
        assert worker.wait(batch_timeout_s) == 0, worker.log_tail()
    finally:
        private_redis.proc.send_signal(signal.SIGCONT)
    log = worker.log_tail(20_000)
    assert "results undelivered" in log and "Traceback" not in log, log
    answered = client.llen("dvr:reply:f")  # no API gathers them: the results wait in the reply list
    assert answered + sum(pending(client).values()) == n, "every task is answered or pending for re-delivery"
    assert answered < n, "Redis froze before the batch was delivered"
