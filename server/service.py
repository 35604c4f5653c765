"""Request orchestration shared by every transport: decompose (cached, single-flight), verify, aggregate.

Knows nothing of HTTP: it takes validated wire models and raw image bytes, and raises
ServiceError, which the API maps to status codes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass

from server.core.questions import Decomposition, DecompositionError, Question, validate_questions
from server.core.reward import aggregate
from server.errors import ErrorCode, ServiceError
from server.queue.base import Broker, Result, Task, TaskKind
from server.queue.keys import Keys
from server.schemas import (
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
)
from trainer_client.grpo import group_advantages


@dataclass(frozen=True)
class ServiceConfig:
    verifier: str
    decomposer: str | None
    pipeline: str
    template_version: str
    queue_prefix: str = "dvr"
    request_timeout_s: float = 120.0
    cache_ttl_s: float = 7 * 24 * 3600


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


class ScoringService:
    def __init__(self, broker: Broker, config: ServiceConfig) -> None:
        self.broker = broker
        self.config = config
        self.keys = Keys(config.queue_prefix)

    @property
    def models(self) -> ModelIds:
        c = self.config
        return ModelIds(verifier=c.verifier, decomposer=c.decomposer, pipeline=c.pipeline if c.decomposer else None)

    def deadline(self) -> float:
        return time.time() + self.config.request_timeout_s

    # ---- decomposition ----------------------------------------------------------------
    def cache_key(self, prompt: str) -> str:
        c = self.config
        raw = json.dumps([prompt, c.pipeline, c.decomposer, c.template_version])
        return "decomp:" + hashlib.sha256(raw.encode()).hexdigest()

    async def decompose_one(self, prompt: str, request_id: str, deadline: float) -> tuple[Decomposition, bool]:
        if not self.config.decomposer:
            raise ServiceError(
                ErrorCode.bad_request,
                "this server has no decomposer configured: pass explicit `questions` for every group",
            )
        task_id = f"{request_id}:dec:{hashlib.sha256(prompt.encode()).hexdigest()[:16]}"

        async def compute() -> bytes:
            reply = self.keys.reply(task_id)
            await self.broker.submit([Task(task_id, TaskKind.decompose, reply, deadline, {"prompt": prompt})])
            result = (await self.broker.gather(reply, {task_id}, deadline))[task_id]
            _raise_for(result, "decomposition")
            return json.dumps(result.data).encode()

        raw, cached = await self.broker.singleflight(self.cache_key(prompt), compute, self.config.cache_ttl_s,
                                                     deadline)
        return Decomposition.model_validate_json(raw), cached

    async def decompose(self, prompts: list[str], request_id: str) -> DecomposeResponse:
        t0 = time.perf_counter()
        deadline = self.deadline()
        unique = list(dict.fromkeys(prompts))
        done = await asyncio.gather(*(self.decompose_one(p, request_id, deadline) for p in unique))
        by_prompt = dict(zip(unique, done, strict=True))
        ms = _ms(t0)
        return DecomposeResponse(
            request_id=request_id,
            decompositions=[by_prompt[p][0] for p in prompts],
            cached=[by_prompt[p][1] for p in prompts],
            timings=Timings(decompose_ms=ms, total_ms=ms),
        )

    # ---- verification -----------------------------------------------------------------
    async def _verify_items(
        self, request_id: str, items: list[tuple[list[bytes], list[str]]], deadline: float
    ) -> list[Result]:
        reply = self.keys.reply(request_id)
        tasks = [
            Task(f"{request_id}:v{i}", TaskKind.verify, reply, deadline, {"questions": qs}, blobs)
            for i, (blobs, qs) in enumerate(items)
        ]
        await self.broker.submit(tasks)
        got = await self.broker.gather(reply, {t.task_id for t in tasks}, deadline)
        return [got[t.task_id] for t in tasks]

    async def verify(self, req: VerifyRequest, blobs: list[list[bytes]], request_id: str) -> VerifyResponse:
        t0 = time.perf_counter()
        results = await self._verify_items(
            request_id, [(b, it.questions) for b, it in zip(blobs, req.items, strict=True)], self.deadline()
        )
        out = [
            VerifyItemResult(p=r.data["p"], error=None) if r.error_code is None and r.data
            else VerifyItemResult(p=None, error=_error_info(r))
            for r in results
        ]
        ms = _ms(t0)
        return VerifyResponse(request_id=request_id, model=self.config.verifier,
                              template_version=self.config.template_version, results=out,
                              timings=Timings(verify_ms=ms, total_ms=ms))

    # ---- scoring ----------------------------------------------------------------------
    async def score(self, req: ScoreRequest, blobs: list[list[bytes]], request_id: str) -> ScoreResponse:
        t0 = time.perf_counter()
        deadline = self.deadline()
        decs = await self._decompositions(req, request_id, deadline)
        t_dec = _ms(t0)
        t1 = time.perf_counter()
        flat: list[tuple[int, int]] = [(g, i) for g, imgs in enumerate(blobs) for i in range(len(imgs))]
        items = [([blobs[g][i]], [q.text for q in decs[g][0].questions]) for g, i in flat]
        results = dict(zip(flat, await self._verify_items(request_id, items, deadline), strict=True))
        t_ver = _ms(t1)
        groups = []
        for g, group in enumerate(req.groups):
            dec, cached = decs[g]
            images = [self._image_result(i, list(dec.questions), results[(g, i)], req) for i in range(len(blobs[g]))]
            groups.append((group, dec, cached, images))
        rewards = [[im.reward for im in images] for *_, images in groups]
        adv = group_advantages(rewards, std=req.advantages.std, eps=req.advantages.eps, clip=req.advantages.clip)
        return ScoreResponse(
            request_id=request_id, models=self.models, template_version=self.config.template_version,
            aggregation=req.aggregation, gating=req.gating,
            groups=[
                GroupResult(
                    prompt=group.prompt, questions=list(dec.questions), rewards=r, advantages=a,
                    images=images if req.details else None, decomposition_cached=cached, metadata=group.metadata,
                )
                for (group, dec, cached, images), r, a in zip(groups, rewards, adv, strict=True)
            ],
            timings=Timings(decompose_ms=t_dec, verify_ms=t_ver, total_ms=_ms(t0)),
        )

    async def _decompositions(
        self, req: ScoreRequest, request_id: str, deadline: float
    ) -> list[tuple[Decomposition, bool | None]]:
        out: list[tuple[Decomposition, bool | None] | None] = [None] * len(req.groups)
        pending: dict[str, list[int]] = {}
        for g, group in enumerate(req.groups):
            if group.questions is not None:
                out[g] = (_explicit(g, group.prompt, group.questions), None)
            elif group.prompt and group.prompt.strip():
                pending.setdefault(group.prompt, []).append(g)
            else:
                raise ServiceError(ErrorCode.bad_request, f"groups[{g}]: give a non-empty `prompt` or `questions`")
        prompts = list(pending)
        done = await asyncio.gather(*(self.decompose_one(p, request_id, deadline) for p in prompts))
        for p, (dec, cached) in zip(prompts, done, strict=True):
            for g in pending[p]:
                out[g] = (dec, cached)
        return [x for x in out if x is not None]

    @staticmethod
    def _image_result(index: int, questions: list[Question], r: Result, req: ScoreRequest) -> ImageResult:
        if r.error_code is not None or not r.data:
            return ImageResult(index=index, reward=None, error=_error_info(r))
        p = dict(zip([q.id for q in questions], r.data["p"], strict=True))
        b = aggregate(questions, p, req.aggregation, req.gating, req.tag_weights)
        return ImageResult(index=index, reward=b.reward, sc=b.sc, pq=b.pq, p=p,
                           failed=[q.id for q in questions if p[q.id] < 0.5])


def _explicit(g: int, prompt: str | None, questions: list[Question]) -> Decomposition:
    try:
        validate_questions(questions)
    except DecompositionError as exc:
        raise ServiceError(ErrorCode.bad_request, f"groups[{g}].questions: {exc}") from exc
    return Decomposition(prompt=prompt or "", questions=tuple(questions), pipeline="explicit")


def _error_info(r: Result) -> ErrorInfo:
    return ErrorInfo(code=(r.error_code or ErrorCode.internal).value, message=r.error or "no result data")


def _raise_for(r: Result, what: str) -> None:
    if r.error_code is not None:
        raise ServiceError(r.error_code, f"{what} failed: {r.error}")
    if not r.data:
        raise ServiceError(ErrorCode.internal, f"{what} returned no data")
