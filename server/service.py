"""Request orchestration shared by every transport: decompose (cached, single-flight), verify, aggregate.

Knows nothing of HTTP: it takes validated wire models and raw image bytes, and raises
ServiceError, which the API maps to status codes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Hashable
from dataclasses import dataclass

from dvreward_protocol.grpo import group_advantages, group_key, lone_image_warnings
from dvreward_protocol.questions import Decomposition, DecompositionError, Question, blank, validate_questions
from dvreward_protocol.reward import check_weights, score_image
from dvreward_protocol.schemas import (
    DecomposeResponse,
    ErrorInfo,
    GroupResult,
    ImageResult,
    ModelIds,
    ScoreRequest,
    ScoreResponse,
    Timings,
    VerifyItemResult,
    VerifyRequest,
    VerifyResponse,
    Warning,
)
from server.errors import ErrorCode, ServiceError
from server.liveness import WorkerWatch
from server.queue.base import ServiceJobs, singleflight
from server.queue.messages import Decomposed, DecomposePayload, Result, Task, TaskKind, Verified, VerifyPayload


@dataclass(frozen=True)
class ServiceConfig:
    """What the service needs of Settings (built by `runtime.build_service`; the defaults live there)."""

    verifier: str  # the verifier's public name, reported until a worker reports its own
    decomposer: str | None  # the decomposer reference: part of the cache key, never reported
    pipeline: str
    template_version: str  # reported until a worker reports its own; covers the verifier's system prompt
    decomposer_templates: str  # the decomposition templates' version: part of the cache key
    # What else changes the questions a decomposer writes, so part of the cache key too: its engine, its output
    # bound and its question caps (semantic, quality).
    decomposer_engine: str
    decomposer_max_new_tokens: int
    decomposer_caps: tuple[int, int]
    verifier_system_prompt: str
    request_timeout_s: float
    cache_ttl_s: float
    result_ttl_s: float
    worker_grace_s: float  # no live worker for a kind of task this long: 503 at once, not 504 at the deadline


Checked = bytes | ServiceError  # an image's bytes, or why this image alone cannot be scored


@dataclass(frozen=True)
class Questions:
    """A group's questions: decomposed (cached or not) or explicit (`cached` None)."""

    decomposition: Decomposition
    cached: bool | None


GroupQuestions = Questions | ServiceError  # or the error that failed that group alone


@dataclass(frozen=True)
class ScoreImages:
    """Per group, each image's bytes (or its error), and the group's source image for editing, if any."""

    images: list[list[Checked]]
    sources: list[Checked | None]


MAX_LATE = 1000  # late decompositions one API process awaits at once
log = logging.getLogger("dvreward.service")


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


class ScoringService:
    def __init__(self, jobs: ServiceJobs, config: ServiceConfig) -> None:
        self.jobs = jobs
        self.config = config
        self.watch = WorkerWatch(jobs, config.worker_grace_s)
        self._late: set[asyncio.Task[None]] = set()  # decompositions finishing after their request's deadline

    def deadline(self) -> float:
        return time.time() + self.config.request_timeout_s

    # ---- decomposition ----------------------------------------------------------------
    def cache_key(self, prompt: str, editing: bool = False) -> str:
        """Everything a decomposition depends on; not the verifier's system prompt, which changes no question."""
        c = self.config
        raw = json.dumps([prompt, c.pipeline, c.decomposer, c.decomposer_templates, c.decomposer_engine,
                          c.decomposer_max_new_tokens, c.decomposer_caps] + (["edit"] if editing else []))
        return "decomp:" + hashlib.sha256(raw.encode()).hexdigest()

    async def decompose_one(self, prompt: str, deadline: float, editing: bool = False) -> Questions:
        if not self.config.decomposer:
            raise ServiceError(
                ErrorCode.bad_request,
                "this server has no decomposer configured: pass explicit `questions` for every group",
            )
        task_id = f"dec:{uuid.uuid4().hex}"  # never derived from client input: ids must not collide
        key = self.cache_key(prompt, editing)

        async def compute() -> bytes:
            reply = task_id  # one decomposition, its own replies
            await self.watch.require(TaskKind.decompose)
            await self.jobs.submit([Task(task_id, reply, deadline, DecomposePayload(prompt=prompt,
                                                                                      editing=editing))])
            try:
                result = await self.watch.waiting(TaskKind.decompose, self.jobs.gather(reply, {task_id}, deadline))
            except ServiceError as exc:
                if exc.code is ErrorCode.timeout:  # the worker may still finish it: keep that work
                    self._publish_late(key, reply, task_id)
                raise
            return _decomposition(result[task_id]).model_dump_json().encode()

        raw, cached = await singleflight(self.jobs, key, compute, self.config.cache_ttl_s, deadline)
        return Questions(Decomposition.model_validate_json(raw), cached)

    def _publish_late(self, key: str, reply: str, task_id: str) -> None:
        """Cache a decomposition its worker finishes after the request's deadline, so the retry finds it."""
        if len(self._late) >= MAX_LATE:
            log.warning("%d late decompositions are awaited already; %s will not be cached", MAX_LATE, task_id)
            return

        async def publish() -> None:
            try:
                got = await self.jobs.gather(reply, {task_id}, time.time() + self.config.result_ttl_s)
                raw = _decomposition(got[task_id]).model_dump_json().encode()
            except ServiceError as exc:
                log.info("decomposition %s did not finish late either: %s", task_id, exc.message)
                return

            async def value() -> bytes:
                return raw

            await singleflight(self.jobs, key, value, self.config.cache_ttl_s, time.time() + 30)
            log.info("decomposition %s finished after its request's deadline; cached", task_id)

        task = asyncio.create_task(publish(), name=f"late-{task_id}")
        self._late.add(task)
        task.add_done_callback(self._late.discard)

    async def decompose(self, prompts: list[str], request_id: str, editing: bool = False) -> DecomposeResponse:
        t0 = time.perf_counter()
        deadline = self.deadline()
        unique = list(dict.fromkeys(prompts))
        done = await asyncio.gather(*(self.decompose_one(p, deadline, editing) for p in unique))
        by_prompt = dict(zip(unique, done, strict=True))
        ms = _ms(t0)
        return DecomposeResponse(
            request_id=request_id,
            decompositions=[by_prompt[p].decomposition for p in prompts],
            cached=[bool(by_prompt[p].cached) for p in prompts],
            timings=Timings(decompose_ms=ms, total_ms=ms),
        )

    # ---- verification -----------------------------------------------------------------
    async def _verify_items(self, items: list[tuple[list[bytes], list[str]]], deadline: float,
                            greedy: bool = False) -> list[Result]:
        """One task per item; ids and the reply key come from a fresh run id, never from the client."""
        run = uuid.uuid4().hex
        reply = run
        tasks = [
            Task(f"{run}:v{i}", reply, deadline, VerifyPayload(questions=tuple(qs), greedy=greedy), blobs)
            for i, (blobs, qs) in enumerate(items)
        ]
        if not tasks:
            return []
        await self.watch.require(TaskKind.verify)
        await self.jobs.submit(tasks)
        got = await self.watch.waiting(TaskKind.verify, self.jobs.gather(reply, {t.task_id for t in tasks}, deadline))
        return [got[t.task_id] for t in tasks]

    async def verify(self, req: VerifyRequest, blobs: list[list[bytes] | ServiceError],
                     request_id: str) -> VerifyResponse:
        """`blobs[i]` is item i's images, or the error that fails that item alone (it is not verified)."""
        t0 = time.perf_counter()
        good = [i for i, b in enumerate(blobs) if not isinstance(b, ServiceError)]
        results = dict(zip(good, await self._verify_items(
            [(b, req.items[i].questions) for i in good if not isinstance(b := blobs[i], ServiceError)],
            self.deadline()), strict=True))
        out = []
        for i, b in enumerate(blobs):
            r: Result | ServiceError = b if isinstance(b, ServiceError) else results[i]
            if isinstance(r, Result) and isinstance(r.value, Verified):
                out.append(VerifyItemResult(p=list(r.value.p), p_source=list(r.value.p_source), error=None))
            else:
                out.append(VerifyItemResult(p=None, error=_error_info(r)))
        ms = _ms(t0)
        model, template, system_prompt = self._reported(list(results.values()))
        return VerifyResponse(request_id=request_id, model=model, template_version=template,
                              verifier_system_prompt=system_prompt, results=out,
                              timings=Timings(verify_ms=ms, total_ms=ms))

    def _reported(self, results: list[Result]) -> tuple[str, str, str]:
        """What really scored (workers report model, template and system prompt), not what this API was told."""
        v = next((r.value for r in results if isinstance(r.value, Verified)), None)
        c = self.config
        return ((v.model, v.template_version, v.system_prompt) if v is not None
                else (c.verifier, c.template_version, c.verifier_system_prompt))

    # ---- scoring ----------------------------------------------------------------------
    async def score(self, req: ScoreRequest, checked: ScoreImages, request_id: str) -> ScoreResponse:
        """Images that cannot be scored (`checked` holds their errors) fail alone; the rest are verified."""
        t0 = time.perf_counter()
        deadline = self.deadline()
        decs = await self._decompositions(req, deadline)
        _check_weights(req, decs)
        t_dec = _ms(t0)
        t1 = time.perf_counter()
        # a group whose decomposition failed sends nothing: its images carry that error instead
        texts = {g: [q.text for q in d.decomposition.questions] for g, d in enumerate(decs) if isinstance(d, Questions)}
        outcomes: dict[tuple[int, int], Result | ServiceError] = {}
        items: dict[tuple[int, int], tuple[list[bytes], list[str]]] = {}
        for g in texts:
            source = checked.sources[g]
            for i, data in enumerate(checked.images[g]):
                if isinstance(source, ServiceError):  # a source that cannot be read fails its whole group
                    outcomes[(g, i)] = source
                elif isinstance(data, ServiceError):
                    outcomes[(g, i)] = data
                else:
                    items[(g, i)] = ([source, data] if source is not None else [data], texts[g])
        outcomes.update(zip(items, await self._verify_items(list(items.values()), deadline, req.answer == "binary"),
                            strict=True))
        t_ver = _ms(t1)
        results = {k: r for k, r in outcomes.items() if isinstance(r, Result)}
        groups = [self._group(g, req, decs[g], [outcomes.get((g, i)) for i in range(len(checked.images[g]))])
                  for g in range(len(req.groups))]
        # a source counts by its bytes, however it travelled (by its text where it could not be read)
        keys = [group_key(group.prompt, s if isinstance(s := checked.sources[g], bytes) else group.source)
                for g, group in enumerate(req.groups)]
        adv = group_advantages([gr.rewards for gr in groups], std=req.advantages.std, eps=req.advantages.eps,
                               clip=req.advantages.clip, keys=keys)
        for gr, a in zip(groups, adv, strict=True):
            gr.advantages = a
            if not req.details:  # `errors` still says why an image has no reward
                gr.images = None
        verifier, template, system_prompt = self._reported(list(results.values()))
        return ScoreResponse(
            request_id=request_id, models=ModelIds(verifier=verifier, **_decomposer_of(decs)),
            template_version=template, verifier_system_prompt=system_prompt,
            aggregation=req.aggregation, gating=req.gating, answer=req.answer, groups=groups,
            warnings=score_warnings(groups, keys, decs),
            timings=Timings(decompose_ms=t_dec, verify_ms=t_ver, total_ms=_ms(t0)),
        )

    def _group(self, g: int, req: ScoreRequest, dec: GroupQuestions,
               results: list[Result | ServiceError | None]) -> GroupResult:
        group = req.groups[g]
        if isinstance(dec, ServiceError):
            err = ErrorInfo(code=dec.code.value, message=dec.message)
            images = [ImageResult(index=i, reward=None, error=err) for i in range(len(results))]
            return GroupResult(prompt=group.prompt, questions=[], rewards=[None] * len(results),
                               errors=[err] * len(results), advantages=[], images=images, decomposition_cached=None,
                               metadata=group.metadata)
        questions = list(dec.decomposition.questions)
        images = []
        for i, r in enumerate(results):
            assert r is not None, "every image of a decomposed group has a verification result"
            try:
                images.append(_image_result(i, questions, r, req))
            except ValueError as exc:  # the request was checked before scoring: this is the server's fault
                raise ServiceError(ErrorCode.aggregation_failed,
                                   f"groups[{g}].images[{i}]: the verification result cannot be aggregated ({exc})"
                                   ) from exc
        return GroupResult(prompt=group.prompt, questions=questions, rewards=[im.reward for im in images],
                           errors=[im.error for im in images], advantages=[], images=images,
                           decomposition_cached=dec.cached, metadata=group.metadata)

    async def _decompositions(self, req: ScoreRequest, deadline: float) -> list[GroupQuestions]:
        """Per group: its questions, or the ServiceError that failed it (that group only)."""
        out: dict[int, GroupQuestions] = {}
        pending: dict[tuple[str, bool], list[int]] = {}  # (prompt, editing) -> groups
        for g, group in enumerate(req.groups):
            if group.questions is not None:
                out[g] = Questions(_explicit(g, group.prompt, group.questions), None)
            elif group.prompt and not blank(group.prompt):
                pending.setdefault((group.prompt, group.source is not None), []).append(g)
            else:
                raise ServiceError(ErrorCode.bad_request, f"groups[{g}]: give a non-empty `prompt` or `questions`")
        prompts = list(pending)
        done = await asyncio.gather(*(self.decompose_one(p, deadline, editing) for p, editing in prompts),
                                    return_exceptions=True)
        for p, res in zip(prompts, done, strict=True):
            if isinstance(res, BaseException) and not (isinstance(res, ServiceError) and res.code in _PER_GROUP):
                raise res  # the service or the request, not this prompt, is the problem: the request fails
            for g in pending[p]:
                out[g] = res
        return [out[g] for g in range(len(req.groups))]


def _check_weights(req: ScoreRequest, decs: list[GroupQuestions]) -> None:
    """Client errors that depend on the questions are found before any image is verified."""
    for g, dec in enumerate(decs):
        if isinstance(dec, Questions):
            try:
                check_weights(dec.decomposition.questions, req.aggregation, req.tag_weights)
            except ValueError as exc:
                raise ServiceError(ErrorCode.bad_request, f"groups[{g}]: {exc}") from exc


def score_warnings(groups: list[GroupResult], keys: list[Hashable | None],
                   decs: list[GroupQuestions]) -> list[Warning]:
    """Results that scored but will not train as a user may expect, per group."""
    out = [Warning(group=g, code="question_cap", message=w)
           for g, d in enumerate(decs) if isinstance(d, Questions) for w in d.decomposition.warnings]
    return out + lone_image_warnings([gr.rewards for gr in groups], keys)


# Decomposition errors that belong to one prompt: only that group's images fail.
_PER_GROUP = (ErrorCode.decomposition_failed, ErrorCode.delivery_limit)


def _image_result(index: int, questions: list[Question], r: Result | ServiceError, req: ScoreRequest) -> ImageResult:
    if isinstance(r, ServiceError) or not isinstance(r.value, Verified):
        return ImageResult(index=index, reward=None, error=_error_info(r))
    ids = [q.id for q in questions]
    if req.answer == "binary" and r.value.answers is None:
        raise ValueError("the worker sent no greedy answers for a binary reward")
    answers = r.value.answers if req.answer == "binary" else None
    s = score_image(questions, r.value.p, req.aggregation, req.gating, req.tag_weights, answers)
    return ImageResult(index=index, reward=s.breakdown.reward, sc=s.breakdown.sc, pq=s.breakdown.pq,
                       p=dict(zip(ids, r.value.p, strict=True)), p_source=dict(zip(ids, r.value.p_source, strict=True)),
                       answers=dict(zip(ids, answers, strict=True)) if answers is not None else None, failed=s.failed)


def _decomposer_of(decs: list[GroupQuestions]) -> dict[str, str | None]:
    """The decomposer that wrote the questions (its own output, fresh or cached); none for explicit questions."""
    made = [d.decomposition for d in decs if isinstance(d, Questions) and d.decomposition.pipeline != "explicit"]
    return {"decomposer": made[0].model, "pipeline": made[0].pipeline} if made else {"decomposer": None,
                                                                                     "pipeline": None}


def _explicit(g: int, prompt: str | None, questions: list[Question]) -> Decomposition:
    try:
        validate_questions(questions)
    except DecompositionError as exc:
        raise ServiceError(ErrorCode.bad_request, f"groups[{g}].questions: {exc}") from exc
    return Decomposition(prompt=prompt or "", questions=tuple(questions), pipeline="explicit")


def _error_info(r: Result | ServiceError) -> ErrorInfo:
    if isinstance(r, ServiceError):
        return ErrorInfo(code=r.code.value, message=r.message)
    if r.error is not None:
        return ErrorInfo(code=r.error.code.value, message=r.error.message)
    return ErrorInfo(code=ErrorCode.internal.value, message=f"a worker answered a verification with {r.value!r:.80}")


def _decomposition(r: Result) -> Decomposition:
    if r.error is not None:
        raise ServiceError(r.error.code, f"decomposition failed: {r.error.message}")
    if not isinstance(r.value, Decomposed):
        raise ServiceError(ErrorCode.internal, f"a worker answered a decomposition with {r.value!r:.80}")
    return r.value.decomposition
