"""Sync and async clients of the DVReward service, built for a GRPO trainer's reward step.

One `score()` call is one logical step: images are encoded in a thread pool, split into requests of at
most `chunk_images` images (and `max_request_bytes`), sent concurrently, and reassembled in order.
Chunking packs whole groups; only a group larger than `chunk_images` is split by images. Rewards are
per image, so that is exact, but advantages need the whole group (and the whole batch for global std):
whenever a step took more than one request, advantages are recomputed here with the same
`group_advantages` the server uses, so chunked and unchunked results agree.

Every POST carries an `Idempotency-Key` (uuid4, the same across retries of that request), so a retry
after a lost response is answered from the first attempt and nothing is scored twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from server.core.questions import Question
from server.core.reward import Aggregation, Gating
from server.schemas import (
    AdvantageOptions,
    Answer,
    DecomposeRequest,
    DecomposeResponse,
    GroupResult,
    ImageResult,
    ModelsResponse,
    ScoreGroup,
    ScoreRequest,
    ScoreResponse,
    Timings,
    VerifyItemIn,
    VerifyItemResult,
    VerifyRequest,
    VerifyResponse,
    Warning,
)
from trainer_client.chunks import Part, plan_chunks, split_by_bytes
from trainer_client.encoding import EncodeOptions, ImageFormat, encode_base64, split_group
from trainer_client.errors import (
    DVRewardError,
    ImageFailed,
    ImageFailure,
    ScoringError,
    ServerError,
    Unavailable,
    error_from_response,
    error_from_transport,
)
from trainer_client.grpo import DEFAULT_CLIP, DEFAULT_EPS, DEFAULT_STD, StdMode, group_advantages
from trainer_client.results import ScoreResult, VerifyResult, lone_image_warnings

log = logging.getLogger("trainer_client")

OnError = Literal["raise", "nan"]
QuestionLike = Question | Mapping[str, Any]
# Generous read timeout: a step waits for the service's own deadline (120 s by default) plus queueing.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=120.0, pool=60.0)
M = TypeVar("M", bound=BaseModel)




# ---- chunk planning ----------------------------------------------------------------------


Encoded = dict[tuple[int, int], list[str]]


@dataclass
class _ScoreJob:
    groups: list[list[Any]]
    prompts: list[str | None]
    questions: list[list[Question] | None]
    metadata: list[dict[str, Any]]
    options: dict[str, Any]
    path: str = "/v1/score"

    def sizes(self) -> list[int]:
        return [len(g) for g in self.groups]

    def images(self, g: int, i: int) -> list[Any]:
        return [self.groups[g][i]]

    def label(self, g: int, i: int, j: int) -> str:
        return f"images[{g}][{i}]"

    def body(self, parts: list[Part], enc: Encoded) -> bytes:
        req = ScoreRequest(groups=[
            ScoreGroup(prompt=self.prompts[p.group], questions=self.questions[p.group], metadata=self.metadata[p.group],
                       images=[enc[(p.group, i)][0] for i in range(p.start, p.stop)])
            for p in parts
        ], **self.options)
        return req.model_dump_json().encode()


@dataclass
class _VerifyJob:
    items: list[list[Any]]
    questions: list[list[str]]
    path: str = "/v1/verify"

    def sizes(self) -> list[int]:
        return [len(self.items)]

    def images(self, g: int, i: int) -> list[Any]:
        return self.items[i]

    def label(self, g: int, i: int, j: int) -> str:
        return f"images[{i}]" if len(self.items[i]) == 1 else f"images[{i}][{j}]"

    def body(self, parts: list[Part], enc: Encoded) -> bytes:
        req = VerifyRequest(items=[VerifyItemIn(images=enc[(0, i)], questions=self.questions[i])
                                   for p in parts for i in range(p.start, p.stop)])
        return req.model_dump_json().encode()


@dataclass
class _Sent(Generic[M]):
    parts: list[Part]
    response: M
    replayed: bool


def _step_warnings(sent: list[_Sent[ScoreResponse]]) -> list[Warning]:
    """The requests' warnings with their group indices mapped to the step's, once each.

    Lone-image warnings are left out: only the whole step can tell (see `lone_image_warnings`).
    """
    out: dict[str, Warning] = {}
    for s in sent:
        for w in s.response.warnings:
            if w.code == "lone_image":
                continue
            mapped = w.model_copy(update={"group": None if w.group is None else s.parts[w.group].group})
            out.setdefault(mapped.model_dump_json(), mapped)
    return list(out.values())


def _as_question(q: QuestionLike) -> Question:
    return q if isinstance(q, Question) else Question.model_validate(q)


def _checked_len(name: str, seq: Sequence[Any] | None, n: int) -> None:
    if seq is not None and len(seq) != n:
        raise ValueError(f"{name} has {len(seq)} entries but there are {n} groups")


def _policy(on_error: str | None, default: OnError) -> OnError:
    if on_error is None:
        return default
    if on_error not in ("raise", "nan"):
        raise ValueError(f"on_error must be 'raise' or 'nan', got {on_error!r}")
    return on_error  # type: ignore[return-value]


def _not_str_seq(name: str, x: object) -> None:
    if isinstance(x, str | bytes) or not isinstance(x, Sequence):
        raise TypeError(f"{name} must be a list (one entry per group), got {type(x).__name__}")


class _Base:
    """Configuration, request building, chunk merging and retry timing shared by both clients."""

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
        if on_error not in ("raise", "nan"):
            raise ValueError(f"on_error must be 'raise' or 'nan', got {on_error!r}")
        if max_retries < 0 or chunk_images < 1 or max_concurrency < 1 or max_request_bytes < 1:
            raise ValueError("max_retries must be >= 0; chunk_images, max_concurrency, max_request_bytes >= 1")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.encode_options = EncodeOptions(image_format, quality, png_compress_level)
        self.chunk_images = chunk_images
        self.max_request_bytes = max_request_bytes
        self.max_concurrency = max_concurrency
        self.on_error: OnError = on_error
        self._headers = {"User-Agent": "dvreward-trainer-client/0.1", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._limits = httpx.Limits(max_connections=max(10, 2 * max_concurrency), max_keepalive_connections=10)
        self._encode_pool = ThreadPoolExecutor(encode_workers or min(8, os.cpu_count() or 1),
                                               thread_name_prefix="dvreward-encode")
        self._rng = random.Random()

    # retries -----------------------------------------------------------------------------
    def _delay(self, attempt: int, err: DVRewardError) -> float | None:
        """Seconds to wait before retry `attempt` (0-based), or None to give up: full jitter, at least Retry-After."""
        if not err.retryable or attempt >= self.max_retries:
            return None
        delay = self._rng.uniform(0.0, min(self.backoff_max, self.backoff_base * 2 ** attempt))
        if err.retry_after is not None:
            delay = max(delay, err.retry_after)
        log.warning("dvreward: %s; retry %d/%d in %.2fs", err, attempt + 1, self.max_retries, delay)
        return delay

    def _post_headers(self, idempotency_key: str | None) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if idempotency_key:
            h["Idempotency-Key"] = idempotency_key
        return h

    @staticmethod
    def _parse(model: type[M], response: httpx.Response) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise ServerError(f"response does not match {model.__name__}: {exc}", code="bad_response",
                              request_id=response.headers.get("X-Request-Id"), status=response.status_code) from exc

    # request building --------------------------------------------------------------------
    def _score_job(self, prompts: Sequence[str | None], images: Sequence[Any],
                   questions: Sequence[Sequence[QuestionLike] | None] | None,
                   metadata: Sequence[Mapping[str, Any] | None] | None, aggregation: Aggregation | str,
                   gating: Gating | str, advantages_std: StdMode, clip: float | None, eps: float,
                   tag_weights: Mapping[str, float] | None, details: bool, answer: Answer) -> _ScoreJob:
        _not_str_seq("prompts", prompts)
        _not_str_seq("images", images)
        n = len(prompts)
        _checked_len("images", images, n)
        _checked_len("questions", questions, n)
        _checked_len("metadata", metadata, n)
        if n == 0:
            raise ValueError("nothing to score: prompts is empty")
        groups = [split_group(g, f"images[{i}]") for i, g in enumerate(images)]
        for i, g in enumerate(groups):
            if not g:
                raise ValueError(f"images[{i}] is an empty group")
        qs = [None if q is None else [_as_question(x) for x in q] for q in (questions or [None] * n)]
        for i, (p, q) in enumerate(zip(prompts, qs, strict=True)):
            if not q and not (isinstance(p, str) and p.strip()):
                raise ValueError(f"group {i}: give a non-empty prompt or explicit questions")
        options = {"aggregation": Aggregation(aggregation), "gating": Gating(gating),
                   "tag_weights": dict(tag_weights) if tag_weights is not None else None,
                   "advantages": AdvantageOptions(std=advantages_std, clip=clip, eps=eps), "details": details,
                   "answer": answer}
        return _ScoreJob(groups, list(prompts), qs, [dict(m or {}) for m in (metadata or [None] * n)], options)

    def _verify_job(self, images: Sequence[Any], questions: Sequence[Sequence[str]] | Sequence[str]) -> _VerifyJob:
        items = [split_group(x, f"images[{i}]") if isinstance(x, list | tuple) else [x]
                 for i, x in enumerate(split_group(images, "images"))]
        if not items:
            raise ValueError("nothing to verify: images is empty")
        _not_str_seq("questions", questions)
        if questions and all(isinstance(q, str) for q in questions):
            qs = [list(questions)] * len(items)  # one question list shared by every item
        else:
            qs = [list(q) for q in questions]
            if len(qs) != len(items):
                raise ValueError(f"questions has {len(qs)} lists but there are {len(items)} items")
        return _VerifyJob(items, qs)

    def _encode_list(self, job: _ScoreJob | _VerifyJob, parts: list[Part]) -> tuple[list[tuple[int, int, int]], list]:
        keys = [(p.group, i, j) for p in parts for i in range(p.start, p.stop)
                for j in range(len(job.images(p.group, i)))]
        return keys, [(job.images(g, i)[j], job.label(g, i, j)) for g, i, j in keys]

    def _encode_one(self, item: tuple[Any, str]) -> str:
        return encode_base64(item[0], self.encode_options, item[1])

    @staticmethod
    def _collect(keys: list[tuple[int, int, int]], encoded: Iterable[str]) -> Encoded:
        out: Encoded = {}
        for (g, i, _j), s in zip(keys, encoded, strict=True):
            out.setdefault((g, i), []).append(s)
        return out

    def _subrequests(self, job: _ScoreJob | _VerifyJob, parts: list[Part], enc: Encoded) -> list[list[Part]]:
        return split_by_bytes(parts, lambda g, i: sum(len(s) for s in enc[(g, i)]) + 64, self.max_request_bytes)

    # merging -----------------------------------------------------------------------------
    def _merge_score(self, job: _ScoreJob, sent: list[_Sent[ScoreResponse]], wall_s: float,
                     on_error: OnError) -> ScoreResult:
        first = sent[0].response
        for s in sent[1:]:
            if (s.response.models, s.response.template_version) != (first.models, first.template_version):
                raise ScoringError("chunks of one step were scored by different models or templates "
                                   f"({first.models} vs {s.response.models}); rescore the step", code="inconsistent")
        if len(sent) == 1:
            response = first
        else:
            response = self._merge_groups(job, sent)
        failures = []
        for g, gr in enumerate(response.groups):
            details = {im.index: im for im in gr.images or ()}
            for i, r in enumerate(gr.rewards):
                if r is None:
                    err = details[i].error if i in details else None
                    failures.append(ImageFailure(g, i, err.code if err else "failed",
                                                 err.message if err else "no reward (request details=True for why)"))
        result = ScoreResult(response, [s.response.request_id for s in sent], any(s.replayed for s in sent), wall_s,
                             failures)
        if failures and on_error == "raise":
            raise ImageFailed(failures, result, request_id=response.request_id)
        return result

    @staticmethod
    def _merge_groups(job: _ScoreJob, sent: list[_Sent[ScoreResponse]]) -> ScoreResponse:
        n = len(job.groups)
        head: list[GroupResult | None] = [None] * n
        rewards: list[list[float | None]] = [[None] * len(g) for g in job.groups]
        images: list[list[ImageResult | None]] = [[None] * len(g) for g in job.groups]
        for s in sent:
            if len(s.response.groups) != len(s.parts):
                raise ScoringError(f"request {s.response.request_id}: sent {len(s.parts)} groups, got "
                                   f"{len(s.response.groups)} back", code="bad_response")
            for part, gr in zip(s.parts, s.response.groups, strict=True):
                g, size = part.group, part.stop - part.start
                if len(gr.rewards) != size:
                    raise ScoringError(f"group {g}: sent {size} images, got {len(gr.rewards)} rewards",
                                       code="bad_response")
                h = head[g]
                if h is None:
                    head[g] = gr
                elif gr.questions != h.questions:
                    raise ScoringError(f"group {g} was split across requests (chunk_images < group size) and its parts "
                                       "got different questions; pass explicit questions or raise chunk_images",
                                       code="inconsistent")
                rewards[g][part.start:part.stop] = gr.rewards
                for im in gr.images or ():
                    images[g][part.start + im.index] = im.model_copy(update={"index": part.start + im.index})
        opts: AdvantageOptions = job.options["advantages"]
        # Chunks only saw part of the batch: recompute over the whole step exactly as the server would.
        adv = group_advantages(rewards, std=opts.std, eps=opts.eps, clip=opts.clip, keys=job.prompts)
        first = sent[0].response
        groups = []
        for g, h in enumerate(head):
            assert h is not None
            ims = images[g]
            groups.append(GroupResult.model_construct(
                prompt=h.prompt, questions=h.questions, rewards=rewards[g], advantages=adv[g],
                images=[im for im in ims if im is not None] if job.options["details"] else None,
                decomposition_cached=h.decomposition_cached, metadata=h.metadata,
            ))
        t = [s.response.timings for s in sent]
        timings = Timings(decompose_ms=max(x.decompose_ms for x in t), verify_ms=max(x.verify_ms for x in t),
                          total_ms=max(x.total_ms for x in t))  # requests ran concurrently: the slowest one
        return ScoreResponse.model_construct(
            request_id=first.request_id, models=first.models, template_version=first.template_version,
            verifier_system_prompt=first.verifier_system_prompt, aggregation=first.aggregation,
            gating=first.gating, answer=first.answer, groups=groups,
            warnings=_step_warnings(sent) + lone_image_warnings(rewards, job.prompts), timings=timings,
        )

    def _merge_verify(self, job: _VerifyJob, sent: list[_Sent[VerifyResponse]], wall_s: float,
                      on_error: OnError) -> VerifyResult:
        first = sent[0].response
        results: list[VerifyItemResult] = []
        for s in sent:
            want = sum(p.stop - p.start for p in s.parts)
            if len(s.response.results) != want:
                raise ScoringError(f"request {s.response.request_id}: sent {want} items, got "
                                   f"{len(s.response.results)} results", code="bad_response")
            results.extend(s.response.results)
        t = [s.response.timings for s in sent]
        response = first if len(sent) == 1 else VerifyResponse.model_construct(
            request_id=first.request_id, model=first.model, template_version=first.template_version, results=results,
            timings=Timings(verify_ms=max(x.verify_ms for x in t), total_ms=max(x.total_ms for x in t)),
        )
        failures = [ImageFailure(0, i, r.error.code if r.error else "failed", r.error.message if r.error else "no p")
                    for i, r in enumerate(results) if r.p is None]
        result = VerifyResult(response, [s.response.request_id for s in sent], any(s.replayed for s in sent), wall_s,
                              [len(q) for q in job.questions], failures)
        if failures and on_error == "raise":
            raise ImageFailed(failures, result, request_id=first.request_id)
        return result


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

    def _request(self, method: str, path: str, *, content: bytes | None = None, idempotency_key: str | None = None,
                 retry: bool = True) -> httpx.Response:
        headers = self._post_headers(idempotency_key) if content is not None else None
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, content=content, headers=headers)
                if response.status_code < 400:
                    return response
                err = error_from_response(response)
            except httpx.TransportError as exc:
                err = error_from_transport(exc)
                err.__cause__ = exc
            delay = self._delay(attempt, err) if retry else None
            if delay is None:
                raise err
            self._sleep(delay)
            attempt += 1

    def _send(self, job: _ScoreJob | _VerifyJob, model: type[M], parts: list[Part]) -> list[_Sent[M]]:
        keys, work = self._encode_list(job, parts)
        enc = self._collect(keys, self._encode_pool.map(self._encode_one, work))
        out = []
        for sub in self._subrequests(job, parts, enc):
            response = self._request("POST", job.path, content=job.body(sub, enc), idempotency_key=uuid.uuid4().hex)
            out.append(_Sent(sub, self._parse(model, response), response.headers.get("Idempotent-Replayed") == "true"))
        return out

    def _run(self, job: _ScoreJob | _VerifyJob, model: type[M]) -> list[_Sent[M]]:
        chunks = plan_chunks(job.sizes(), self.chunk_images)
        if len(chunks) == 1:
            return self._send(job, model, chunks[0])
        futures = [self._request_pool.submit(self._send, job, model, c) for c in chunks]
        try:
            return [s for f in futures for s in f.result()]
        finally:
            for f in futures:
                f.cancel()

    def score(
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
    ) -> ScoreResult:
        """Score groups: images[i] is the group (list or 4-D batch) of prompts[i]; questions[i] skips decomposition.

        Failed images follow `on_error` (client default if None): "nan" gives NaN rewards, "raise" raises
        ImageFailed (with `.result`). Request-level failures always raise a DVRewardError. Advantages are the
        reference's by default (population std over the whole step, clipped to ±5), computed over the whole
        step even when it took several requests; groups with the same prompt form one GRPO group.
        `answer="binary"` scores each question 1 where yes outweighs no, else 0.
        """
        t0, policy = time.perf_counter(), _policy(on_error, self.on_error)
        job = self._score_job(prompts, images, questions, metadata, aggregation, gating, advantages_std, clip, eps,
                              tag_weights, details, answer)
        sent = self._run(job, ScoreResponse)
        return self._merge_score(job, sent, time.perf_counter() - t0, policy)

    def verify(self, images: Sequence[Any], questions: Sequence[Sequence[str]] | Sequence[str],
               on_error: OnError | None = None) -> VerifyResult:
        """P(yes) for explicit question texts: images[i] is one image, or a [source, result] list for editing.

        `questions` is one list per item, or a single list of strings asked of every item.
        """
        t0, policy = time.perf_counter(), _policy(on_error, self.on_error)
        job = self._verify_job(images, questions)
        sent = self._run(job, VerifyResponse)
        return self._merge_verify(job, sent, time.perf_counter() - t0, policy)

    def decompose(self, prompts: Sequence[str]) -> DecomposeResponse:
        """Questions per prompt (cached server-side), e.g. to inspect or pin them before training."""
        _not_str_seq("prompts", prompts)
        body = DecomposeRequest(prompts=list(prompts)).model_dump_json().encode()
        return self._parse(DecomposeResponse, self._request("POST", "/v1/decompose", content=body))

    def health(self) -> dict[str, Any]:
        """GET /healthz once (a probe, so no retries): the API process is alive; says nothing about workers."""
        return self._request("GET", "/healthz", retry=False).json()

    def ready(self) -> dict[str, Any]:
        """GET /readyz once, without retries: raises Unavailable when no worker is live."""
        return self._request("GET", "/readyz", retry=False).json()

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.5) -> dict[str, Any]:
        """Poll /readyz until the service can score (models load for a while after start)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.ready()
            except (Unavailable, ServerError) as exc:
                if time.monotonic() + interval > deadline:
                    raise Unavailable(f"service at {self.base_url} not ready after {timeout}s: {exc.message}",
                                      code="not_ready") from exc
                self._sleep(interval)

    def models(self) -> ModelsResponse:
        """Live workers and the models they serve."""
        return self._parse(ModelsResponse, self._request("GET", "/v1/models"))


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

    async def _request(self, method: str, path: str, *, content: bytes | None = None,
                       idempotency_key: str | None = None, retry: bool = True) -> httpx.Response:
        headers = self._post_headers(idempotency_key) if content is not None else None
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, content=content, headers=headers)
                if response.status_code < 400:
                    return response
                err = error_from_response(response)
            except httpx.TransportError as exc:
                err = error_from_transport(exc)
                err.__cause__ = exc
            delay = self._delay(attempt, err) if retry else None
            if delay is None:
                raise err
            await self._sleep(delay)
            attempt += 1

    async def _send(self, job: _ScoreJob | _VerifyJob, model: type[M], parts: list[Part]) -> list[_Sent[M]]:
        keys, work = self._encode_list(job, parts)
        loop = asyncio.get_running_loop()
        encoded = await asyncio.gather(*(loop.run_in_executor(self._encode_pool, self._encode_one, w) for w in work))
        enc = self._collect(keys, encoded)
        out = []
        for sub in self._subrequests(job, parts, enc):
            response = await self._request("POST", job.path, content=job.body(sub, enc),
                                           idempotency_key=uuid.uuid4().hex)
            out.append(_Sent(sub, self._parse(model, response), response.headers.get("Idempotent-Replayed") == "true"))
        return out

    async def _run(self, job: _ScoreJob | _VerifyJob, model: type[M]) -> list[_Sent[M]]:
        sem = asyncio.Semaphore(self.max_concurrency)

        async def one(parts: list[Part]) -> list[_Sent[M]]:
            async with sem:
                return await self._send(job, model, parts)

        tasks = [asyncio.ensure_future(one(c)) for c in plan_chunks(job.sizes(), self.chunk_images)]
        try:
            done = await asyncio.gather(*tasks)
        finally:
            for t in tasks:  # a failed or cancelled chunk stops the others; no-op once all are done
                t.cancel()
        return [s for d in done for s in d]

    async def score(
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
    ) -> ScoreResult:
        """See DVRewardClient.score."""
        t0, policy = time.perf_counter(), _policy(on_error, self.on_error)
        job = self._score_job(prompts, images, questions, metadata, aggregation, gating, advantages_std, clip, eps,
                              tag_weights, details, answer)
        sent = await self._run(job, ScoreResponse)
        return self._merge_score(job, sent, time.perf_counter() - t0, policy)

    async def verify(self, images: Sequence[Any], questions: Sequence[Sequence[str]] | Sequence[str],
                     on_error: OnError | None = None) -> VerifyResult:
        """See DVRewardClient.verify."""
        t0, policy = time.perf_counter(), _policy(on_error, self.on_error)
        job = self._verify_job(images, questions)
        sent = await self._run(job, VerifyResponse)
        return self._merge_verify(job, sent, time.perf_counter() - t0, policy)

    async def decompose(self, prompts: Sequence[str]) -> DecomposeResponse:
        _not_str_seq("prompts", prompts)
        body = DecomposeRequest(prompts=list(prompts)).model_dump_json().encode()
        return self._parse(DecomposeResponse, await self._request("POST", "/v1/decompose", content=body))

    async def health(self) -> dict[str, Any]:
        return (await self._request("GET", "/healthz", retry=False)).json()

    async def ready(self) -> dict[str, Any]:
        return (await self._request("GET", "/readyz", retry=False)).json()

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self.ready()
            except (Unavailable, ServerError) as exc:
                if time.monotonic() + interval > deadline:
                    raise Unavailable(f"service at {self.base_url} not ready after {timeout}s: {exc.message}",
                                      code="not_ready") from exc
                await self._sleep(interval)

    async def models(self) -> ModelsResponse:
        return self._parse(ModelsResponse, await self._request("GET", "/v1/models"))

