"""Sync and async clients of the DVReward service, built for a GRPO trainer's reward step.

One `score()` call is one logical step: images are encoded in a thread pool, split into requests of at
most `chunk_images` images (and `max_request_bytes`), sent concurrently, and reassembled in order
(`jobs`). Every POST carries an `Idempotency-Key` (uuid4, the same across retries of that request), so a
retry after a lost response is answered from the first attempt and nothing is scored twice.

Each call is written once, as a flow (`flow`): `_Base` holds the flows, and the two clients differ
only in how they carry out its effects, with threads or with asyncio.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Concatenate, ParamSpec, TypeVar

import httpx

from dvreward_protocol.grpo import DEFAULT_CLIP, DEFAULT_EPS, DEFAULT_STD, StdMode
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
from trainer_client.encoding import EncodeOptions, ImageFormat, encode_base64
from trainer_client.errors import ServerError, Unavailable
from trainer_client.flow import Backoff, Effect, Encode, Flow, Gather, Send, Sleep, parse, request
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
from trainer_client.results import ScoreResult, VerifyResult

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
    ) -> None:
        if max_retries < 0 or chunk_images < 1 or max_concurrency < 1 or max_request_bytes < 1:
            raise ValueError("max_retries must be >= 0; chunk_images, max_concurrency, max_request_bytes >= 1")
        self.base_url = base_url.rstrip("/")
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

    def _encode_one(self, item: tuple[Any, str]) -> str:
        return encode_base64(item[0], self.encode_options, item[1])

    # building blocks ---------------------------------------------------------------------
    def _post(self, path: str, body: bytes, idempotency_key: str | None = None) -> Flow[httpx.Response]:
        headers = {"Content-Type": "application/json"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return request(Send("POST", path, body, headers), self.backoff)

    def _send(self, job: Job, model: type[M], parts: list[Part]) -> Flow[list[Sent[M]]]:
        keys, work = encode_work(job, parts)
        enc = collect(keys, (yield Encode(work)))
        out = []
        for sub in subrequests(job, parts, enc, self.max_request_bytes):
            response = yield from self._post(job.path, job.body(sub, enc), uuid.uuid4().hex)
            out.append(Sent(sub, parse(model, response), response.headers.get("Idempotent-Replayed") == "true"))
        return out

    def _encode_sources(self, job: ScoreJob) -> Flow[None]:
        work = source_work(job)
        set_sources(job, (yield Encode(work)) if work else [])

    def _run(self, job: Job, model: type[M]) -> Flow[list[Sent[M]]]:
        done = yield Gather([self._send(job, model, c) for c in plan_chunks(job.sizes(), self.chunk_images)])
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
        and source. `answer="binary"` scores each question 1 where yes outweighs no, else 0.
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
        self._sleep: Callable[[float], None] = time.sleep

    def __enter__(self) -> DVRewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()
        self._request_pool.shutdown(wait=False, cancel_futures=True)
        self._encode_pool.shutdown(wait=False, cancel_futures=True)

    score = _blocking(_Base._score)
    verify = _blocking(_Base._verify)
    decompose = _blocking(_Base._decompose)
    health = _blocking(_Base._health)
    ready = _blocking(_Base._ready)
    wait_ready = _blocking(_Base._wait_ready)
    models = _blocking(_Base._models)

    def _drive(self, flow: Flow[T]) -> T:
        outcome: Any = None
        failure: httpx.TransportError | None = None
        try:
            while True:
                try:
                    effect = flow.send(outcome) if failure is None else flow.throw(failure)
                except StopIteration as done:
                    return done.value
                outcome, failure = None, None
                try:
                    outcome = self._effect(effect)
                except httpx.TransportError as exc:
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

    async def __aenter__(self) -> AsyncDVRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        self._encode_pool.shutdown(wait=False, cancel_futures=True)

    score = _awaitable(_Base._score)
    verify = _awaitable(_Base._verify)
    decompose = _awaitable(_Base._decompose)
    health = _awaitable(_Base._health)
    ready = _awaitable(_Base._ready)
    wait_ready = _awaitable(_Base._wait_ready)
    models = _awaitable(_Base._models)

    async def _drive(self, flow: Flow[T]) -> T:
        outcome: Any = None
        failure: httpx.TransportError | None = None
        try:
            while True:
                try:
                    effect = flow.send(outcome) if failure is None else flow.throw(failure)
                except StopIteration as done:
                    return done.value
                outcome, failure = None, None
                try:
                    outcome = await self._effect(effect)
                except httpx.TransportError as exc:
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
