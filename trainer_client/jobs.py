"""What one client call sends and how its answers become one result: pure, no I/O.

Both clients run the same plan: build a job from the caller's arguments, encode its images, cut it
into requests (`chunks`), send them, then merge the responses here. Chunking packs whole groups; only
a group larger than `chunk_images` is split by images. Rewards are per image, so that is exact, but
advantages need the whole group (and the whole batch for global std): whenever a step took more than
one request, advantages are recomputed here with the same `group_advantages` the server uses, so
chunked and unchunked results agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, cast

from pydantic import BaseModel

from dvreward_protocol.grpo import StdMode, group_advantages, lone_image_warnings
from dvreward_protocol.questions import Question
from dvreward_protocol.reward import Aggregation, Gating
from dvreward_protocol.schemas import (
    AdvantageOptions,
    Answer,
    GroupResult,
    ImageResult,
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
from trainer_client.chunks import Part, split_by_bytes
from trainer_client.encoding import split_group
from trainer_client.errors import ImageFailed, ImageFailure, ScoringError
from trainer_client.results import ScoreResult, VerifyResult

OnError = Literal["raise", "nan"]
QuestionLike = Question | Mapping[str, Any]
M = TypeVar("M", bound=BaseModel)
Encoded = dict[tuple[int, int], list[str]]
EncodeWork = list[tuple[Any, str]]  # (image, label for errors) in request order


@dataclass
class ScoreJob:
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
class VerifyJob:
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


Job = ScoreJob | VerifyJob


@dataclass
class Sent(Generic[M]):
    """One request's parts of the job and its parsed answer."""

    parts: list[Part]
    response: M
    replayed: bool


# ---- building jobs from the caller's arguments -----------------------------------------------


def policy(on_error: str | None, default: OnError) -> OnError:
    if on_error is None:
        return default
    if on_error in ("raise", "nan"):
        return cast(OnError, on_error)
    raise ValueError(f"on_error must be 'raise' or 'nan', got {on_error!r}")


def not_str_seq(name: str, x: object) -> None:
    if isinstance(x, str | bytes) or not isinstance(x, Sequence):
        raise TypeError(f"{name} must be a list (one entry per group), got {type(x).__name__}")


def _checked_len(name: str, seq: Sequence[Any] | None, n: int) -> None:
    if seq is not None and len(seq) != n:
        raise ValueError(f"{name} has {len(seq)} entries but there are {n} groups")


def _as_question(q: QuestionLike) -> Question:
    return q if isinstance(q, Question) else Question.model_validate(q)


def score_job(prompts: Sequence[str | None], images: Sequence[Any],
              questions: Sequence[Sequence[QuestionLike] | None] | None,
              metadata: Sequence[Mapping[str, Any] | None] | None, aggregation: Aggregation | str,
              gating: Gating | str, advantages_std: StdMode, clip: float | None, eps: float,
              tag_weights: Mapping[str, float] | None, details: bool, answer: Answer) -> ScoreJob:
    not_str_seq("prompts", prompts)
    not_str_seq("images", images)
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
    return ScoreJob(groups, list(prompts), qs, [dict(m or {}) for m in (metadata or [None] * n)], options)


def verify_job(images: Sequence[Any], questions: Sequence[Sequence[str]] | Sequence[str]) -> VerifyJob:
    items = [split_group(x, f"images[{i}]") if isinstance(x, list | tuple) else [x]
             for i, x in enumerate(split_group(images, "images"))]
    if not items:
        raise ValueError("nothing to verify: images is empty")
    not_str_seq("questions", questions)
    if questions and all(isinstance(q, str) for q in questions):
        qs = [[str(q) for q in questions]] * len(items)  # one question list shared by every item
    else:
        qs = [list(q) for q in questions]
        if len(qs) != len(items):
            raise ValueError(f"questions has {len(qs)} lists but there are {len(items)} items")
    return VerifyJob(items, qs)


# ---- encoding and cutting into requests ------------------------------------------------------


def encode_work(job: Job, parts: list[Part]) -> tuple[list[tuple[int, int, int]], EncodeWork]:
    """The images of these parts, in order, with the (group, unit, image) key each encoding belongs to."""
    keys = [(p.group, i, j) for p in parts for i in range(p.start, p.stop)
            for j in range(len(job.images(p.group, i)))]
    return keys, [(job.images(g, i)[j], job.label(g, i, j)) for g, i, j in keys]


def collect(keys: list[tuple[int, int, int]], encoded: Iterable[str]) -> Encoded:
    out: Encoded = {}
    for (g, i, _j), s in zip(keys, encoded, strict=True):
        out.setdefault((g, i), []).append(s)
    return out


def subrequests(parts: list[Part], enc: Encoded, max_request_bytes: int) -> list[list[Part]]:
    return split_by_bytes(parts, lambda g, i: sum(len(s) for s in enc[(g, i)]) + 64, max_request_bytes)


# ---- merging answers -------------------------------------------------------------------------


def step_warnings(sent: list[Sent[ScoreResponse]]) -> list[Warning]:
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


def merge_score(job: ScoreJob, sent: list[Sent[ScoreResponse]], wall_s: float, on_error: OnError) -> ScoreResult:
    first = sent[0].response
    for s in sent[1:]:
        if (s.response.models, s.response.template_version) != (first.models, first.template_version):
            raise ScoringError("chunks of one step were scored by different models or templates "
                               f"({first.models} vs {s.response.models}); rescore the step", code="inconsistent")
    if len(sent) == 1:
        response = first
    else:
        response = _merge_groups(job, sent)
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


def _merge_groups(job: ScoreJob, sent: list[Sent[ScoreResponse]]) -> ScoreResponse:
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
        warnings=step_warnings(sent) + lone_image_warnings(rewards, job.prompts), timings=timings,
    )


def merge_verify(job: VerifyJob, sent: list[Sent[VerifyResponse]], wall_s: float, on_error: OnError) -> VerifyResult:
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
        request_id=first.request_id, model=first.model, template_version=first.template_version,
        verifier_system_prompt=first.verifier_system_prompt, results=results,
        timings=Timings(verify_ms=max(x.verify_ms for x in t), total_ms=max(x.total_ms for x in t)),
    )
    failures = [ImageFailure(0, i, r.error.code if r.error else "failed", r.error.message if r.error else "no p")
                for i, r in enumerate(results) if r.p is None]
    result = VerifyResult(response, [s.response.request_id for s in sent], any(s.replayed for s in sent), wall_s,
                          [len(q) for q in job.questions], failures)
    if failures and on_error == "raise":
        raise ImageFailed(failures, result, request_id=first.request_id)
    return result
