"""A worker: claims batches from the broker, runs the engines off the event loop, delivers results.

One loop per task kind owns its batch (a batch the engine fails is retried item by item, so
only the item at fault gets the error), a heartbeat keeps the worker visible to /readyz and
/v1/models, and a stop event drains: the batch in hand is finished and delivered, nothing new
is claimed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

from pydantic import ValidationError

from dvreward_protocol.questions import Decomposition
from dvreward_protocol.schemas import WorkerInfo
from server.engines.base import Decomposer, EngineError, ItemScores, Verifier, VerifyItem
from server.errors import ErrorCode, ServiceError
from server.images import load_image
from server.queue.base import Broker, collect_batch
from server.queue.messages import Decomposed, DecomposePayload, Result, Task, TaskKind, Verified, VerifyPayload
from server.worker_metrics import WorkerMetrics

log = logging.getLogger("dvreward.worker")


class WorkerHung(RuntimeError):
    """A batch ran past the batch timeout: the engine is stuck in a thread nothing can stop. The worker
    stops renewing its claims (other workers get the tasks), leaves the registry and must exit."""


class Worker:
    def __init__(
        self,
        broker: Broker,
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
        self.broker = broker
        self.verifier = verifier
        self.decomposer = decomposer
        self.batch_size = batch_size
        self.batch_wait = batch_wait
        self.heartbeat_s = heartbeat_s
        self.batch_timeout_s = batch_timeout_s
        self.max_image_pixels = max_image_pixels
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
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
        self._stop = stop
        loops = [self._heartbeat(stop)]
        if self.verifier is not None:
            loops.append(self._loop(stop, TaskKind.verify, self._verify))
        if self.decomposer is not None:
            loops.append(self._loop(stop, TaskKind.decompose, self._decompose))
        try:
            async with asyncio.TaskGroup() as group:  # one loop failing stops all: no half-alive worker
                for loop in loops:
                    group.create_task(loop)
        finally:
            try:
                await self.broker.remove_worker(self.worker_id)
            except ServiceError as exc:
                log.warning("could not deregister worker %s: %s", self.worker_id, exc.message)

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.info.heartbeat_at = time.time()
            try:
                await self.broker.heartbeat(self.info, ttl=3 * self.heartbeat_s)
                self._unregistered = None
            except ServiceError as exc:
                log.warning("heartbeat failed: %s", exc.message)
                self._unregistered = f"its heartbeat did not reach the queue: {exc.message}"
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.heartbeat_s)
            except TimeoutError:
                continue

    async def _loop(
        self, stop: asyncio.Event, kind: TaskKind, handle: Callable[[list[Task]], Awaitable[list[Result]]]
    ) -> None:
        async def fetch(n: int, timeout: float) -> list[Task]:
            return await self.broker.claim(kind, n, timeout)

        while not stop.is_set():
            try:
                batch = await collect_batch(fetch, self.batch_size, self.batch_wait if self.batch_wait > 0 else 0.001)
            except ServiceError as exc:
                log.warning("claiming %s tasks failed (%s); retrying in 1 s", kind.value, exc.message)
                await asyncio.sleep(1.0)
                continue
            if not batch:
                continue
            live = []
            for t in batch:
                if t.expired:
                    expired = Result.failure(t.task_id, ErrorCode.expired, "request deadline passed")
                    self.metrics.outcome(t, expired)
                    await self._deliver(stop, t, expired)
                else:
                    live.append(t)
            if live:
                start = time.perf_counter()
                results = await self._leased(live, handle(live))
                self.metrics.batch(kind, len(live), time.perf_counter() - start)
                for t, r in zip(live, results, strict=True):
                    self.metrics.outcome(t, r)
                    await self._deliver(stop, t, r)

    async def _leased(self, tasks: list[Task], work: Awaitable[list[Result]]) -> list[Result]:
        """Run the batch while renewing its claim, so a long batch is not re-delivered to another worker."""
        async def renew() -> None:
            while True:
                await asyncio.sleep(self.heartbeat_s)
                try:
                    await self.broker.extend(tasks)
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

    async def _deliver(self, stop: asyncio.Event, task: Task, result: Result) -> None:
        """Keep the result until the queue is back; once stopping, leave the task to re-delivery."""
        while True:
            try:
                await self.broker.complete(task, result)
                return
            except ServiceError as exc:
                if stop.is_set():
                    log.warning("stopping with %s undelivered (%s); it stays pending and is re-delivered",
                                task.task_id, exc.message)
                    return
                log.warning("delivering %s failed (%s); retrying in 1 s", task.task_id, exc.message)
                await asyncio.sleep(1.0)

    async def _verify(self, tasks: list[Task]) -> list[Result]:
        return await asyncio.to_thread(self._verify_sync, tasks)

    def _verify_sync(self, tasks: list[Task]) -> list[Result]:
        """Decode and score off the event loop; an undecodable or unscorable item fails alone."""
        assert self.verifier is not None
        results: dict[int, Result] = {}
        items: list[VerifyItem] = []
        owners: list[int] = []
        for i, t in enumerate(tasks):
            assert isinstance(t.payload, VerifyPayload), "the verify stream holds verify tasks only"
            try:
                images = tuple(load_image(b, self.max_image_pixels) for b in t.blobs)
                items.append(VerifyItem(images, t.payload.questions))
                owners.append(i)
            except (ValueError, ServiceError) as exc:
                results[i] = Result.failure(t.task_id, ErrorCode.bad_image, str(exc))
        for i, outcome in zip(owners, self._scores(items), strict=True):
            results[i] = self._verified(tasks[i].task_id, outcome)
        return [results[i] for i in range(len(tasks))]

    def _verified(self, task_id: str, outcome: ItemScores | Exception) -> Result:
        """The scores with what produced them (the API may run other settings), or why there are none."""
        assert self.verifier is not None
        if isinstance(outcome, Exception):
            return Result.failure(task_id, ErrorCode.verification_failed, _reason(outcome))
        try:
            value = Verified(p=outcome.p, p_source=outcome.source, model=self.verifier_id,
                             template_version=self.info.template_version, system_prompt=self.verifier.system_prompt)
        except ValidationError as exc:
            return Result.failure(task_id, ErrorCode.verification_failed,
                                  f"the verifier returned scores that are not probabilities: {exc}")
        return Result(task_id=task_id, value=value)

    def _scores(self, items: list[VerifyItem]) -> list[ItemScores | Exception]:
        """The batch in one call; if it fails, item by item, so one bad item cannot fail other requests."""
        assert self.verifier is not None
        if not items:
            return []
        try:
            return list(self.verifier.verify_each(items))
        except Exception as exc:  # noqa: BLE001 - retried alone below, or reported to the request
            if len(items) == 1:
                log.warning("verification failed: %s", exc)
                return [exc]
            log.warning("verifier batch of %d items failed (%s); retrying them one by one", len(items), exc)
        return [out for item in items for out in self._scores([item])]

    async def _decompose(self, tasks: list[Task]) -> list[Result]:
        """The whole batch in one batched generation; a prompt that cannot be decomposed fails alone."""
        assert self.decomposer is not None
        outcomes: Sequence[Decomposition | Exception]
        prompts = []
        for t in tasks:
            assert isinstance(t.payload, DecomposePayload), "the decompose stream holds decompose tasks only"
            prompts.append(t.payload.prompt)
        try:
            outcomes = await asyncio.to_thread(self.decomposer.decompose_each, prompts)
        except Exception as exc:  # noqa: BLE001 - the whole batch failed: every request hears why
            log.exception("decomposer batch of %d prompts failed", len(tasks))
            outcomes = [exc] * len(tasks)
        out = []
        for t, o in zip(tasks, outcomes, strict=True):
            if isinstance(o, Exception):
                log.warning("decomposition of task %s failed: %s", t.task_id, o)
                out.append(Result.failure(t.task_id, ErrorCode.decomposition_failed, _reason(o)))
            else:
                named = o.model_copy(update={"model": self.decomposer_id})
                out.append(Result(task_id=t.task_id, value=Decomposed(decomposition=named)))
        return out


def _reason(exc: Exception) -> str:
    kind = "" if isinstance(exc, EngineError) else f"{type(exc).__name__}: "
    return f"{kind}{exc}"
