"""Sync and async clients of the DVReward service, built for a GRPO trainer's reward step.

One `score()` call is one logical step: images are encoded in a thread pool, split into requests of at
most `chunk_images` images (and `max_request_bytes`), sent concurrently, and reassembled in order
(`jobs`). Every POST carries an `Idempotency-Key` (uuid4, the same across retries of that request), so a
retry after a lost response is answered from the first attempt and nothing is scored twice. Images travel
as binary multipart parts where the server takes them, else as base64 in JSON (`wire`).

Each call is written once, as a flow (`flow`): `_Base` holds the flows, and the two clients differ
only in how they carry out its effects, with threads or with asyncio.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import os
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

import httpx

from dvreward_protocol.grpo import DEFAULT_CLIP, DEFAULT_EPS, DEFAULT_STD, StdMode
from dvreward_protocol.reflection import rectify
from dvreward_protocol.reward import Aggregation, Gating
from dvreward_protocol.schemas import (
    Answer,
    DecomposeRequest,
    DecomposeResponse,
    ModelsResponse,
    ScoreResponse,
    VerifyResponse,
)
from trainer_client.chunks import Part, plan_chunks
from trainer_client.encoding import EncodeOptions, ImageFormat, encode_image, split_group
from trainer_client.errors import ServerError, Unavailable, check_base_url
from trainer_client.flow import SEND_FAILURES, Backoff, Effect, Encode, Flow, Gather, Send, Sleep, parse, request
from trainer_client.jobs import (
    Job,
    M,
    OnError,
    QuestionLike,
    ScoreJob,
    Sent,
    collect,
    encode_work,
    merge_score,
    merge_verify,
    not_str_seq,
    policy,
    score_job,
    set_sources,
    source_work,
    subrequests,
    verify_job,
)
from trainer_client.results import RefinedResult, ScoreResult, VerifyResult
from trainer_client.submit import (
    Batcher,
    GroupOptions,
    GroupScore,
    StepOptions,
    Submission,
    group_scores,
    merge_step,
)
from trainer_client.wire import JSON, RequestFormat, offers_multipart

# Generous read timeout: a step waits for the service's own deadline (120 s by default) plus queueing.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=120.0, pool=60.0)
P = ParamSpec("P")
T = TypeVar("T")


class _Base:
    """Configuration and every call as a flow; subclasses only carry out the effects."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        image_format: ImageFormat = "jpeg",
        quality: int | None = None,
        png_compress_level: int = 1,
        chunk_images: int = 64,
        max_request_bytes: int = 48 * 1024 * 1024,
        max_concurrency: int = 4,
        encode_workers: int | None = None,
        on_error: OnError = "raise",
        headers: Mapping[str, str] | None = None,
        submit_window_s: float = 0.005,
        request_format: RequestFormat = "auto",
    ) -> None:
        """`submit_window_s`: how long a submitted group waits for others to share its request. `request_format`:
        how images travel; "auto" asks the server once (GET /v1/models) and sends them as binary multipart parts
        where it takes them, else as base64 in JSON; "json" or "multipart" decide without asking."""
        if max_retries < 0 or chunk_images < 1 or max_concurrency < 1 or max_request_bytes < 1:
            raise ValueError("max_retries must be >= 0; chunk_images, max_concurrency, max_request_bytes >= 1")
        if not 0 <= submit_window_s <= 10:
            raise ValueError(f"submit_window_s must be in [0, 10] seconds, got {submit_window_s}")
        if request_format not in ("auto", "json", "multipart"):
            raise ValueError(f"request_format must be 'auto', 'json' or 'multipart', got {request_format!r}")
        self.multipart: bool | None = None if request_format == "auto" else request_format == "multipart"
        self.submit_window_s = submit_window_s
        self.base_url = check_base_url(base_url)
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.backoff = Backoff(max_retries, backoff_base, backoff_max)
        self.encode_options = EncodeOptions(image_format, quality, png_compress_level)
        self.chunk_images = chunk_images
        self.max_request_bytes = max_request_bytes
        self.max_concurrency = max_concurrency
        self.on_error: OnError = policy(on_error, "raise")
        self._headers = {"User-Agent": "dvreward-trainer-client/0.1", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._limits = httpx.Limits(max_connections=max(10, 2 * max_concurrency), max_keepalive_connections=10)
        self._encode_pool = ThreadPoolExecutor(encode_workers or min(8, os.cpu_count() or 1),
                                               thread_name_prefix="dvreward-encode")

    def _encode_one(self, item: tuple[Any, str]) -> bytes:
        return encode_image(item[0], self.encode_options, item[1])

    # building blocks ---------------------------------------------------------------------
    def _post(self, path: str, body: bytes, idempotency_key: str | None = None,
              content_type: str = JSON) -> Flow[httpx.Response]:
        headers = {"Content-Type": content_type}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return request(Send("POST", path, body, headers), self.backoff)

    def _multipart(self) -> Flow[bool]:
        """Whether images go as multipart parts: unless the client was told, asked of the server once (Accept-Post of
        GET /v1/models); a server that does not list the form (an older one) gets JSON."""
        if self.multipart is None:
            response = yield from request(Send("GET", "/v1/models"), self.backoff)
            self.multipart = offers_multipart(response.headers.get("Accept-Post"))
        return self.multipart

    def _send(self, job: Job, model: type[M], parts: list[Part], multipart: bool) -> Flow[list[Sent[M]]]:
        keys, work = encode_work(job, parts)
        enc = collect(keys, (yield Encode(work)))
        out = []
        for sub in subrequests(job, parts, enc, self.max_request_bytes, multipart):
            body, content_type = job.body(sub, enc, multipart)
            response = yield from self._post(job.path, body, uuid.uuid4().hex, content_type)
            out.append(Sent(sub, parse(model, response), response.headers.get("Idempotent-Replayed") == "true"))
        return out

    def _encode_sources(self, job: ScoreJob) -> Flow[None]:
        work = source_work(job)
        set_sources(job, (yield Encode(work)) if work else [])

    def _run(self, job: Job, model: type[M]) -> Flow[list[Sent[M]]]:
        multipart = yield from self._multipart()
        done = yield Gather([self._send(job, model, c, multipart) for c in plan_chunks(job.sizes(), self.chunk_images)])
        return [s for d in done for s in d]

    # the calls ---------------------------------------------------------------------------
    def _score(
        self,
        prompts: Sequence[str | None],
        images: Sequence[Any],
        questions: Sequence[Sequence[QuestionLike] | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        aggregation: Aggregation | str = Aggregation.geometric,
        gating: Gating | str = Gating.none,
        advantages_std: StdMode = DEFAULT_STD,
        clip: float | None = DEFAULT_CLIP,
        eps: float = DEFAULT_EPS,
        tag_weights: Mapping[str, float] | None = None,
        details: bool = True,
        on_error: OnError | None = None,
        answer: Answer = "prob",
        sources: Sequence[Any | None] | None = None,
    ) -> Flow[ScoreResult]:
        """Score groups: images[i] is the group (list or 4-D batch) of prompts[i]; questions[i] skips decomposition.

        Failed images follow `on_error` (client default if None): "nan" gives NaN rewards, "neutral" their GRPO
        group's mean reward (advantage 0), "raise" raises ImageFailed (with `.result`); `.failures` lists them
        either way. Request-level failures always raise a DVRewardError. Advantages are the reference's by
        default (population std over the whole step, clipped to ±5), computed over the whole step even when it
        took several requests; groups with the same prompt form one GRPO group. `sources[i]` (editing): the
        image group i was edited from, shown before each of its images; groups are then GRPO groups per prompt
        and source. `answer="binary"` scores each question 1 where its greedy answer is yes, else 0 (the
        reference's dvreward_binary).
        """
        t0, how = time.perf_counter(), policy(on_error, self.on_error)
        job = score_job(prompts, images, questions, metadata, aggregation, gating, advantages_std, clip, eps,
                        tag_weights, details, answer, sources)
        yield from self._encode_sources(job)
        sent = yield from self._run(job, ScoreResponse)
        return merge_score(job, sent, time.perf_counter() - t0, how)

    def _verify(self, images: Sequence[Any], questions: Sequence[Sequence[str]] | Sequence[str],
                on_error: OnError | None = None) -> Flow[VerifyResult]:
        """P(yes) for explicit question texts: images[i] is one image, or a [source, result] list for editing.

        `questions` is one list per item, or a single list of strings asked of every item.
        """
        t0, how = time.perf_counter(), policy(on_error, self.on_error)
        job = verify_job(images, questions)
        sent = yield from self._run(job, VerifyResponse)
        return merge_verify(job, sent, time.perf_counter() - t0, how)

    def _decompose(self, prompts: Sequence[str]) -> Flow[DecomposeResponse]:
        """Questions per prompt (cached server-side), e.g. to inspect or pin them before training."""
        not_str_seq("prompts", prompts)
        body = DecomposeRequest(prompts=list(prompts)).model_dump_json().encode()
        return parse(DecomposeResponse, (yield from self._post("/v1/decompose", body)))

    def _score_refined(self, stage1: ScoreResult, refined: Sequence[Any], starts: Sequence[int | Sequence[int]],
                       advantages_std: StdMode = DEFAULT_STD, clip: float | None = DEFAULT_CLIP,
                       eps: float = DEFAULT_EPS, details: bool = True) -> Flow[RefinedResult]:
        """The reflection round's second stage: refined[g] are refinements of stage-1 images starts[g] (one index
        for all, or one per refinement), scored against group g's stage-1 questions with its options (and, for
        editing, its source image).

        Returns the rectified rewards (false positive rectification), `improved` flags, advantages over them
        and `any_improved`. Pick the images to refine with `select_for_refinement(stage1.rewards)`.
        """
        groups = [split_group(r, f"refined[{g}]") for g, r in enumerate(refined)]
        if len(groups) != len(stage1.groups) or len(starts) != len(groups):
            raise ValueError(f"{len(groups)} refined groups and {len(starts)} starts for {len(stage1.groups)} "
                             "stage-1 groups: give one of each per group")
        first = [[s] * len(g) if isinstance(s, int) else list(s) for s, g in zip(starts, groups, strict=True)]
        for g, (idx, imgs) in enumerate(zip(first, groups, strict=True)):
            if len(idx) != len(imgs) or not all(0 <= i < len(stage1.groups[g].rewards) for i in idx):
                raise ValueError(f"starts[{g}]: one stage-1 image index per refined image, within the group")
        r = stage1.response
        questions = [qs or None for qs in stage1.questions]  # a group whose decomposition failed tries again
        result = yield from self._score(stage1.prompts, groups, questions=questions, on_error="nan",
                                        aggregation=r.aggregation, gating=r.gating, answer=r.answer, details=details,
                                        advantages_std=advantages_std, clip=clip, eps=eps, sources=stage1.sources)
        start = [[stage1.rewards[g][i] for i in idx] for g, idx in enumerate(first)]
        return RefinedResult(result, start, rectify(result.rewards, start, result.keys, advantages_std, eps, clip))

    def _score_batch(self, batch: list[Submission[Any]]) -> Flow[list[GroupScore]]:
        """Submitted groups with equal options, in one call (split into requests as any step is)."""
        sources = [s.source for s in batch]
        result = yield from self._score(
            [s.prompt for s in batch], [s.images for s in batch], questions=[s.questions for s in batch],
            metadata=[s.metadata for s in batch], on_error="nan",
            sources=sources if any(x is not None for x in sources) else None, **batch[0].options.score_kwargs())
        return group_scores(result)

    def _step_options(self, *, aggregation: Aggregation | str = Aggregation.geometric,
                      gating: Gating | str = Gating.none, tag_weights: Mapping[str, float] | None = None,
                      details: bool = True, answer: Answer = "prob", advantages_std: StdMode = DEFAULT_STD,
                      clip: float | None = DEFAULT_CLIP, eps: float = DEFAULT_EPS,
                      on_error: OnError | None = None) -> tuple[GroupOptions, StepOptions, OnError]:
        """A step's options: how each group is scored, how the step's advantages are, what a failed image is."""
        return (GroupOptions.of(aggregation, gating, tag_weights, details, answer),
                StepOptions(advantages_std, clip, eps), policy(on_error, self.on_error))

    def _health(self) -> Flow[dict[str, Any]]:
        """GET /healthz once (a probe, so no retries): the API process is alive; says nothing about workers."""
        return (yield from request(Send("GET", "/healthz"), None)).json()

    def _ready(self) -> Flow[dict[str, Any]]:
        """GET /readyz once, without retries: raises Unavailable when no worker is live."""
        return (yield from request(Send("GET", "/readyz"), None)).json()

    def _wait_ready(self, timeout: float = 60.0, interval: float = 0.5) -> Flow[dict[str, Any]]:
        """Poll /readyz until the service can score (models load for a while after start)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return (yield from self._ready())
            except (Unavailable, ServerError) as exc:
                if time.monotonic() + interval > deadline:
                    raise Unavailable(f"service at {self.base_url} not ready after {timeout}s: {exc.message}",
                                      code="not_ready") from exc
            yield Sleep(interval)

    def _models(self) -> Flow[ModelsResponse]:
        """Live workers and the models they serve."""
        return parse(ModelsResponse, (yield from request(Send("GET", "/v1/models"), self.backoff)))


def submission(prompt: str | None, images: Any, questions: Sequence[QuestionLike] | None,
               metadata: Mapping[str, Any] | None, source: Any | None, options: GroupOptions, future: T,
               ) -> Submission[T]:
    """A submitted group, checked now (a bad argument raises in the caller, not later in its future)."""
    job = score_job([prompt], [images], [questions], [metadata], options.aggregation, options.gating, DEFAULT_STD,
                    DEFAULT_CLIP, DEFAULT_EPS, options.score_kwargs()["tag_weights"], options.details, options.answer,
                    [source])
    return Submission(prompt, job.groups[0], questions, metadata, source, options, future)


def _public(flow: Callable[..., Any], call: Callable[..., Any]) -> None:
    """Give a client method the flow's name, docs and parameters (what help() and IDEs show)."""
    call.__name__ = call.__qualname__ = flow.__name__.lstrip("_")
    call.__doc__ = flow.__doc__
    call.__signature__ = inspect.signature(flow).replace(return_annotation=inspect.Signature.empty)  # type: ignore[attr-defined]


def _blocking(flow: Callable[Concatenate[_Base, P], Flow[T]]) -> Callable[Concatenate[DVRewardClient, P], T]:
    def call(self: DVRewardClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._drive(flow(self, *args, **kwargs))

    _public(flow, call)
    return call


def _awaitable(flow: Callable[Concatenate[_Base, P], Flow[T]],
               ) -> Callable[Concatenate[AsyncDVRewardClient, P], Coroutine[Any, Any, T]]:
    async def call(self: AsyncDVRewardClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._drive(flow(self, *args, **kwargs))

    _public(flow, call)
    return call


# ---- the synchronous client --------------------------------------------------------------------


class DVRewardClient(_Base):
    """Blocking client; thread-safe. Use as a context manager or call close()."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 transport: httpx.BaseTransport | None = None, **kwargs: Any) -> None:
        super().__init__(base_url, api_key, **kwargs)
        self._http = httpx.Client(base_url=self.base_url, timeout=self.timeout, headers=self._headers,
                                  limits=self._limits, transport=transport)
        self._request_pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="dvreward-request")
        self._submit_pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="dvreward-submit")
        self._batcher: Batcher[concurrent.futures.Future[GroupScore]] = Batcher(self.chunk_images)
        self._submit_lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._closed = False
        self._sleep: Callable[[float], None] = time.sleep

    def __enter__(self) -> DVRewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Submitted groups are sent and answered first: nothing submitted is dropped."""
        self._closed = True
        self._flush()
        self._submit_pool.shutdown(wait=True)
        self._http.close()
        self._request_pool.shutdown(wait=False, cancel_futures=True)
        self._encode_pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, prompt: str | None, images: Any, questions: Sequence[QuestionLike] | None = None, *,
               metadata: Mapping[str, Any] | None = None, source: Any | None = None,
               aggregation: Aggregation | str = Aggregation.geometric, gating: Gating | str = Gating.none,
               tag_weights: Mapping[str, float] | None = None, details: bool = True,
               answer: Answer = "prob") -> concurrent.futures.Future[GroupScore]:
        """Score one group as soon as it is generated; returns at once with a future of its GroupScore.

        Groups submitted within `submit_window_s` share a request (up to `chunk_images` images, sent at once
        when reached). A request-level failure is the future's exception; failed images are listed in the
        GroupScore. Advantages need the whole step: collect the step's groups with `step()`.
        """
        if self._closed:
            raise RuntimeError("the client is closed")
        future: concurrent.futures.Future[GroupScore] = concurrent.futures.Future()
        sub = submission(prompt, images, questions, metadata, source,
                         GroupOptions.of(aggregation, gating, tag_weights, details, answer), future)
        with self._submit_lock:
            full = self._batcher.add(sub)
            if not full and self._timer is None:
                self._timer = threading.Timer(self.submit_window_s, self._flush)
                self._timer.daemon = True
                self._timer.start()
        if full:
            self._flush()
        return sub.future

    def step(self, **options: Any) -> Step:
        """A GRPO step scored while it is generated: `step.submit(...)` each group, then `step.result()`.
        Options: those of score() but for on_error's default, which is the client's."""
        return Step(self, *self._step_options(**options))

    def _flush(self) -> None:
        with self._submit_lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            batches = self._batcher.take()
        for batch in batches:
            self._submit_pool.submit(self._complete, batch)

    def _complete(self, batch: list[Submission[concurrent.futures.Future[GroupScore]]]) -> None:
        live = [s for s in batch if s.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            scores = self._drive(self._score_batch(live))
        except Exception as exc:  # noqa: BLE001 - every submission of the failed batch hears why
            for s in live:
                s.future.set_exception(exc)
            return
        for s, score in zip(live, scores, strict=True):
            s.future.set_result(score)

    score = _blocking(_Base._score)
    score_refined = _blocking(_Base._score_refined)
    verify = _blocking(_Base._verify)
    decompose = _blocking(_Base._decompose)
    health = _blocking(_Base._health)
    ready = _blocking(_Base._ready)
    wait_ready = _blocking(_Base._wait_ready)
    models = _blocking(_Base._models)

    def _drive(self, flow: Flow[T]) -> T:
        outcome: Any = None
        failure: Exception | None = None
        try:
            while True:
                try:
                    effect = flow.send(outcome) if failure is None else flow.throw(failure)
                except StopIteration as done:
                    return done.value
                outcome, failure = None, None
                try:
                    outcome = self._effect(effect)
                except SEND_FAILURES as exc:
                    failure = exc
        finally:
            flow.close()

    def _effect(self, effect: Effect) -> Any:
        if isinstance(effect, Send):
            return self._http.request(effect.method, effect.path, content=effect.content, headers=effect.headers)
        if isinstance(effect, Sleep):
            return self._sleep(effect.seconds)
        if isinstance(effect, Encode):
            return list(self._encode_pool.map(self._encode_one, effect.work))
        if len(effect.flows) == 1:
            return [self._drive(effect.flows[0])]
        futures = [self._request_pool.submit(self._drive, f) for f in effect.flows]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()


# ---- the asynchronous client -------------------------------------------------------------------


class AsyncDVRewardClient(_Base):
    """asyncio client: same API as DVRewardClient with `await`; encoding still runs in a thread pool."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None, **kwargs: Any) -> None:
        super().__init__(base_url, api_key, **kwargs)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, headers=self._headers,
                                       limits=self._limits, transport=transport)
        self._sleep: Callable[[float], Any] = asyncio.sleep
        self._batcher: Batcher[asyncio.Future[GroupScore]] = Batcher(self.chunk_images)
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> AsyncDVRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Submitted groups are sent and answered first: nothing submitted is dropped."""
        self._flush()
        await asyncio.gather(*self._running, return_exceptions=True)
        await self._http.aclose()
        self._encode_pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, prompt: str | None, images: Any, questions: Sequence[QuestionLike] | None = None, *,
               metadata: Mapping[str, Any] | None = None, source: Any | None = None,
               aggregation: Aggregation | str = Aggregation.geometric, gating: Gating | str = Gating.none,
               tag_weights: Mapping[str, float] | None = None, details: bool = True,
               answer: Answer = "prob") -> asyncio.Future[GroupScore]:
        """As DVRewardClient.submit, from a running event loop; await the returned future."""
        loop = asyncio.get_running_loop()
        sub = submission(prompt, images, questions, metadata, source,
                         GroupOptions.of(aggregation, gating, tag_weights, details, answer), loop.create_future())
        if self._batcher.add(sub):
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.submit_window_s, self._flush)
        return sub.future

    def step(self, **options: Any) -> AsyncStep:
        """As DVRewardClient.step; `await step.result()`."""
        return AsyncStep(self, *self._step_options(**options))

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for batch in self._batcher.take():
            task = asyncio.ensure_future(self._complete(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _complete(self, batch: list[Submission[asyncio.Future[GroupScore]]]) -> None:
        live = [s for s in batch if not s.future.cancelled()]
        if not live:
            return
        try:
            scores = await self._drive(self._score_batch(live))
        except Exception as exc:  # noqa: BLE001 - every submission of the failed batch hears why
            for s in live:
                if not s.future.done():
                    s.future.set_exception(exc)
            return
        for s, score in zip(live, scores, strict=True):
            if not s.future.done():
                s.future.set_result(score)

    score = _awaitable(_Base._score)
    score_refined = _awaitable(_Base._score_refined)
    verify = _awaitable(_Base._verify)
    decompose = _awaitable(_Base._decompose)
    health = _awaitable(_Base._health)
    ready = _awaitable(_Base._ready)
    wait_ready = _awaitable(_Base._wait_ready)
    models = _awaitable(_Base._models)

    async def _drive(self, flow: Flow[T]) -> T:
        outcome: Any = None
        failure: Exception | None = None
        try:
            while True:
                try:
                    effect = flow.send(outcome) if failure is None else flow.throw(failure)
                except StopIteration as done:
                    return done.value
                outcome, failure = None, None
                try:
                    outcome = await self._effect(effect)
                except SEND_FAILURES as exc:
                    failure = exc
        finally:
            flow.close()

    async def _effect(self, effect: Effect) -> Any:
        if isinstance(effect, Send):
            return await self._http.request(effect.method, effect.path, content=effect.content,
                                            headers=effect.headers)
        if isinstance(effect, Sleep):
            return await self._sleep(effect.seconds)
        if isinstance(effect, Encode):
            loop = asyncio.get_running_loop()
            return await asyncio.gather(*(loop.run_in_executor(self._encode_pool, self._encode_one, w)
                                          for w in effect.work))
        sem = asyncio.Semaphore(self.max_concurrency)

        async def one(flow: Flow[Any]) -> Any:
            async with sem:
                return await self._drive(flow)

        tasks = [asyncio.ensure_future(one(f)) for f in effect.flows]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for t in tasks:  # a failed or cancelled flow stops the others; no-op once all are done
                t.cancel()


# ---- steps -------------------------------------------------------------------------------------
class _StepBase(Generic[T]):
    def __init__(self, client: Any, group: GroupOptions, options: StepOptions, on_error: OnError) -> None:
        self._client, self._group, self._options, self._on_error = client, group, options, on_error
        self._futures: list[T] = []
        self._t0 = time.perf_counter()

    def submit(self, prompt: str | None, images: Any, questions: Sequence[QuestionLike] | None = None, *,
               metadata: Mapping[str, Any] | None = None, source: Any | None = None) -> T:
        """Send this group now (it shares a request with groups submitted within the client's window)."""
        future = self._client.submit(prompt, images, questions, metadata=metadata, source=source,
                                     **self._group.score_kwargs())
        self._futures.append(future)
        return future

    def _merge(self, scored: list[GroupScore]) -> ScoreResult:
        return merge_step(scored, self._options, self._on_error, time.perf_counter() - self._t0)


class Step(_StepBase[concurrent.futures.Future[GroupScore]]):
    """One GRPO step submitted group by group; `result()` waits for the last and merges them."""

    def __enter__(self) -> Step:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:  # the step failed while generating: nothing will read its rewards
            for f in self._futures:
                f.cancel()

    def result(self, timeout: float | None = None) -> ScoreResult:
        """The step's ScoreResult, groups in submission order, advantages over the whole step (the same as one
        `score()` call on the same groups); failed images follow the step's on_error."""
        return self._merge([f.result(timeout) for f in self._futures])


class AsyncStep(_StepBase[asyncio.Future[GroupScore]]):
    """Step for AsyncDVRewardClient: `await step.result()`."""

    async def __aenter__(self) -> AsyncStep:
        return self

    async def __aexit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            for f in self._futures:
                f.cancel()

    async def result(self) -> ScoreResult:
        return self._merge(list(await asyncio.gather(*self._futures)))
