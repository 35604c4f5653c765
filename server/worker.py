"""A worker: claims batches from the queue, runs the engines off the event loop, delivers results.

One loop per task kind owns its batch (a batch the engine fails is retried item by item, so
only the item at fault gets the error), a heartbeat keeps the worker visible to /readyz and
/v1/models, and a stop event drains: the batch in hand is finished and delivered, nothing new
is claimed. Stopping is bounded in every state: filling a batch ends at once, a batch ends within the
batch timeout, and results that cannot be delivered while stopping are left to re-delivery.
A queue that is down or refuses commands (a 503 ServiceError) is retried with bounded backoff by
every loop; anything else that ends a loop ends the worker, for its process to exit and be restarted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from pydantic import ValidationError

from dvreward_protocol.questions import Decomposition
from dvreward_protocol.schemas import WorkerInfo
from server.engines.base import Decomposer, EngineError, ItemScores, Verifier, VerifyItem
from server.errors import ErrorCode, ServiceError
from server.images import load_image
from server.queue.base import WorkerJobs, collect_batch
from server.queue.messages import Decomposed, DecomposePayload, Result, Task, TaskKind, Verified, VerifyPayload
from server.worker_metrics import WorkerMetrics

log = logging.getLogger("dvreward.worker")


def new_worker_id() -> str:
    """host-pid-random: one host's workers differ by pid (a supervisor's children), a restart by the suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def runs_on(worker_id: str, host: str) -> bool:
    """Whether `worker_id` (from new_worker_id) names a worker on `host`; host names may hold '-' themselves."""
    return re.fullmatch(rf"{re.escape(host)}-\d+-[0-9a-f]{{6}}", worker_id) is not None


def death_reason(exc: BaseException) -> str:
    """The errors a background task ended with (a task group's come wrapped in an ExceptionGroup that names none)."""
    leaves = exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,)
    return "; ".join(death_reason(e) if isinstance(e, BaseExceptionGroup) else f"{type(e).__name__}: {e}"
                     for e in leaves)


class WorkerHung(RuntimeError):
    """A batch ran past the batch timeout: the engine is stuck in a thread nothing can stop. The worker
    stops renewing its claims (other workers get the tasks), leaves the registry and must exit."""


class Worker:
    def __init__(
        self,
        jobs: WorkerJobs,
        verifier: Verifier | None,
        decomposer: Decomposer | None,
        *,
        template_version: str,
        batch_size: int,
        batch_wait: float,
        heartbeat_s: float,
        batch_timeout_s: float,
        max_image_pixels: int,
        worker_id: str | None = None,
        public_ids: tuple[str | None, str | None] = (None, None),
        metrics: WorkerMetrics | None = None,
    ) -> None:
        """`public_ids` (verifier, decomposer) are the names results report; by default the engines' ids."""
        if verifier is None and decomposer is None:
            raise ValueError("a worker needs a verifier, a decomposer, or both")
        self.jobs = jobs
        self.verifier = verifier
        self.decomposer = decomposer
        self.batch_size = batch_size
        self.batch_wait = batch_wait
        self.heartbeat_s = heartbeat_s
        self.batch_timeout_s = batch_timeout_s
        self.max_image_pixels = max_image_pixels
        self.worker_id = worker_id or new_worker_id()
        self.verifier_id = public_ids[0] or (verifier.model_id if verifier else "")
        self.decomposer_id = public_ids[1] or (decomposer.model_id if decomposer else None)
        self.info = WorkerInfo(
            worker_id=self.worker_id,
            verifier=self.verifier_id,
            decomposer=self.decomposer_id if decomposer else None,
            pipeline=decomposer.pipeline if decomposer else None,
            template_version=template_version,
            capacity=batch_size,
            started_at=time.time(),
            heartbeat_at=time.time(),
        )
        self.metrics = metrics or WorkerMetrics()
        self.metrics.info.labels(self.worker_id, self.verifier_id, self.decomposer_id or "").set(1)
        self._stop: asyncio.Event | None = None  # set by run(): the worker takes tasks until it is set
        self._unregistered: str | None = "its first heartbeat has not reached the queue yet"

    def readiness(self) -> str | None:
        """Why this worker cannot take tasks now, or None: its loops run and the queue has its heartbeat."""
        if self._stop is None:
            return "not running yet"
        if self._stop.is_set():
            return "draining: finishing the batch in hand, then exiting"
        return self._unregistered

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set (then drain), or until a loop fails: then every loop ends and the error is
        raised, so that the process exits and its supervisor restarts it.

        Loops end on `halt`, which a stop and a failed loop both set, not on the task group's cancellation alone: a
        loop can miss its cancellation (Python 3.11's asyncio.wait_for returns an inner result that finished at the
        same moment), and the one left running kept a worker alive with no heartbeat or no work.
        """
        self._stop = stop
        halt = asyncio.Event()

        async def until_stopped() -> None:
            await stop.wait()
            halt.set()

        async def halting(loop: Coroutine[Any, Any, None]) -> None:
            try:
                await loop
            finally:
                halt.set()

        loops = [self._heartbeat(halt)]
        if self.verifier is not None:
            loops.append(self._loop(halt, TaskKind.verify, self._verify))
        if self.decomposer is not None:
            loops.append(self._loop(halt, TaskKind.decompose, self._decompose))
        try:
            async with asyncio.TaskGroup() as group:  # one loop failing stops all: no half-alive worker
                group.create_task(until_stopped())
                for loop in loops:
                    group.create_task(halting(loop))
        finally:
            try:
                await self.jobs.remove_worker(self.worker_id)
            except ServiceError as exc:
                log.warning("could not deregister worker %s: %s", self.worker_id, exc.message)

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.info.heartbeat_at = time.time()
            try:
                await self.jobs.heartbeat(self.info, ttl=3 * self.heartbeat_s)
                self._unregistered = None
            except ServiceError as exc:
                log.warning("heartbeat failed: %s", exc.message)
                self._unregistered = f"its heartbeat did not reach the queue: {exc.message}"
            await _pause(stop, self.heartbeat_s)

    async def _loop(
        self, stop: asyncio.Event, kind: TaskKind, handle: Callable[[list[Task]], Awaitable[list[Result]]]
    ) -> None:
        async def fetch(n: int, timeout: float) -> list[Task]:
            return await self.jobs.claim(kind, n, timeout)

        backoff = Backoff()
        while not stop.is_set():
            try:
                batch = await collect_batch(fetch, self.batch_size, max(self.batch_wait, 0.001), stop)
            except ServiceError as exc:
                delay = backoff.next()
                log.warning("claiming %s tasks failed (%s); retrying in %.1f s", kind.value, exc.message, delay)
                await _pause(stop, delay)
                continue
            backoff.reset()
            live = [t for t in batch if not t.expired]
            expired = [(t, Result.failure(t.task_id, ErrorCode.expired, "request deadline passed"))
                       for t in batch if t.expired]
            for t, r in expired:
                self.metrics.outcome(t, r)
            if not await self._deliver_all(stop, expired) or not live:
                continue
            start = time.perf_counter()
            results = await self._leased(live, handle(live))
            self.metrics.batch(kind, len(live), time.perf_counter() - start)
            for t, r in zip(live, results, strict=True):
                self.metrics.outcome(t, r)
            await self._deliver_all(stop, list(zip(live, results, strict=True)))

    async def _leased(self, tasks: list[Task], work: Awaitable[list[Result]]) -> list[Result]:
        """Run the batch while renewing its claim, so a long batch is not re-delivered to another worker."""
        async def renew() -> None:
            while True:
                await asyncio.sleep(self.heartbeat_s)
                try:
                    await self.jobs.extend(tasks)
                except ServiceError as exc:
                    log.warning("renewing the claim on %d tasks failed: %s", len(tasks), exc.message)

        renewer = asyncio.create_task(renew())
        try:
            return await asyncio.wait_for(work, timeout=self.batch_timeout_s)
        except TimeoutError as exc:
            log.critical("a batch of %d tasks ran past the batch timeout of %g s: the engine is hung; leaving "
                         "the registry and exiting so that a supervisor restarts this worker",
                         len(tasks), self.batch_timeout_s)
            raise WorkerHung(f"a batch of {len(tasks)} tasks ran past {self.batch_timeout_s:g} s") from exc
        finally:
            renewer.cancel()

    async def _deliver_all(self, stop: asyncio.Event, done: list[tuple[Task, Result]]) -> bool:
        """The batch's results in one round trip, kept until the queue is back; once stopping, a failure leaves them
        to re-delivery (retrying would hold the stop). False if they are left."""
        backoff = Backoff()
        while done:
            try:
                await self.jobs.complete(done)
                break
            except ServiceError as exc:
                if stop.is_set():
                    log.warning("stopping with %d results undelivered (%s); their tasks stay pending and are "
                                "re-delivered", len(done), exc.message)
                    return False
                delay = backoff.next()
                log.warning("delivering %d results failed (%s); retrying in %.1f s", len(done), exc.message, delay)
                await _pause(stop, delay)
        return True

    async def _verify(self, tasks: list[Task]) -> list[Result]:
        return await asyncio.to_thread(self._verify_sync, tasks)

    def _verify_sync(self, tasks: list[Task]) -> list[Result]:
        """Decode and score off the event loop; an undecodable or unscorable item fails alone."""
        assert self.verifier is not None
        results: dict[int, Result] = {}
        items: dict[bool, list[VerifyItem]] = {False: [], True: []}  # by greedy: asked for greedy answers or not
        owners: dict[bool, list[int]] = {False: [], True: []}
        for i, t in enumerate(tasks):
            assert isinstance(t.payload, VerifyPayload), "the verify stream holds verify tasks only"
            try:
                images = tuple(load_image(b, self.max_image_pixels) for b in t.blobs)
                items[t.payload.greedy].append(VerifyItem(images, t.payload.questions))
                owners[t.payload.greedy].append(i)
            except (ValueError, ServiceError) as exc:
                results[i] = Result.failure(t.task_id, ErrorCode.bad_image, str(exc))
        for greedy in (False, True):
            for i, outcome in zip(owners[greedy], self._scores(items[greedy], greedy), strict=True):
                results[i] = self._verified(tasks[i].task_id, outcome)
        return [results[i] for i in range(len(tasks))]

    def _verified(self, task_id: str, outcome: ItemScores | Exception) -> Result:
        """The scores with what produced them (the API may run other settings), or why there are none."""
        assert self.verifier is not None
        if isinstance(outcome, Exception):
            return Result.failure(task_id, ErrorCode.verification_failed, _reason(outcome))
        try:
            value = Verified(p=outcome.p, p_source=outcome.source, model=self.verifier_id,
                             template_version=self.info.template_version, system_prompt=self.verifier.system_prompt,
                             answers=outcome.answers)
        except ValidationError as exc:
            return Result.failure(task_id, ErrorCode.verification_failed,
                                  f"the verifier returned scores that are not probabilities: {exc}")
        return Result(task_id=task_id, value=value)

    def _scores(self, items: list[VerifyItem], greedy: bool) -> list[ItemScores | Exception]:
        """The batch in one call; if it fails, item by item, so one bad item cannot fail other requests."""
        assert self.verifier is not None
        if not items:
            return []
        try:
            return list(self.verifier.verify_each(items, greedy=greedy))
        except Exception as exc:  # noqa: BLE001 - retried alone below, or reported to the request
            if len(items) == 1:
                log.warning("verification failed: %s", exc)
                return [exc]
            log.warning("verifier batch of %d items failed (%s); retrying them one by one", len(items), exc)
        return [out for item in items for out in self._scores([item], greedy)]

    async def _decompose(self, tasks: list[Task]) -> list[Result]:
        """Batched generation (prompts and editing instructions apart); a prompt that cannot be decomposed fails
        alone."""
        assert self.decomposer is not None
        payloads = []
        for t in tasks:
            assert isinstance(t.payload, DecomposePayload), "the decompose stream holds decompose tasks only"
            payloads.append(t.payload)
        outcomes: dict[int, Decomposition | Exception] = {}
        for editing in (False, True):
            idx = [i for i, p in enumerate(payloads) if p.editing is editing]
            if not idx:
                continue
            try:
                done: Sequence[Decomposition | Exception] = await asyncio.to_thread(
                    self.decomposer.decompose_each, [payloads[i].prompt for i in idx], editing=editing)
            except Exception as exc:  # noqa: BLE001 - the whole batch failed: every request hears why
                log.exception("decomposer batch of %d prompts failed", len(idx))
                done = [exc] * len(idx)
            outcomes.update(zip(idx, done, strict=True))
        out = []
        for t, o in zip(tasks, (outcomes[i] for i in range(len(tasks))), strict=True):
            if isinstance(o, Exception):
                log.warning("decomposition of task %s failed: %s", t.task_id, o)
                out.append(Result.failure(t.task_id, ErrorCode.decomposition_failed, _reason(o)))
            else:
                named = o.model_copy(update={"model": self.decomposer_id})
                out.append(Result(task_id=t.task_id, value=Decomposed(decomposition=named)))
        return out


class Backoff:
    """Pauses between retries of a queue that is down: doubling from FIRST_S to at most MAX_S, each drawn between
    half and all of that (workers that failed together do not retry together), and from the start after a success."""

    FIRST_S = 0.25
    MAX_S = 5.0

    def __init__(self) -> None:
        self.failures = 0

    def next(self) -> float:
        self.failures = min(self.failures + 1, 32)  # past MAX_S anyway; unbounded, 2 ** n overflows a float
        return min(self.MAX_S, self.FIRST_S * 2 ** (self.failures - 1)) * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.failures = 0


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, unless the worker is told to stop first."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return


def _reason(exc: Exception) -> str:
    kind = "" if isinstance(exc, EngineError) else f"{type(exc).__name__}: "
    return f"{kind}{exc}"
