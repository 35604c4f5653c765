"""What one client call sends and how its answers become one result: pure, no I/O.

Both clients run the same plan: build a job from the caller's arguments, encode its images, cut it
into requests (`chunks`), send them, then merge the responses here. Chunking packs whole groups; only
a group larger than `chunk_images` is split by images. Rewards are per image, so that is exact, but
advantages need the whole group (and the whole batch for global std): whenever a step took more than
one request, advantages are recomputed here with the same `group_advantages` the server uses, so
chunked and unchunked results agree.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from pydantic import BaseModel

from dvreward_protocol.grpo import StdMode, group_advantages, group_key, lone_image_warnings
from dvreward_protocol.questions import DecompositionError, Question, blank, validate_questions
from dvreward_protocol.reward import Aggregation, Gating
from dvreward_protocol.schemas import (
    AdvantageOptions,
    Answer,
    ErrorInfo,
    GroupResult,
    ImageResult,
    ModelIds,
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
from trainer_client.results import OnError, ScoreResult, VerifyResult
from trainer_client.wire import Body, wire_size

QuestionLike = Question | Mapping[str, Any]
M = TypeVar("M", bound=BaseModel)
Encoded = dict[tuple[int, int], list[bytes]]  # encoded image files, by (group, unit)
EncodeWork = list[tuple[Any, str]]  # (image, label for errors) in request order


@dataclass
class ScoreJob:
    groups: list[list[Any]]
    prompts: list[str | None]
    questions: list[list[Question] | None]
    metadata: list[dict[str, Any]]
    options: dict[str, Any]
    sources: list[Any | None]  # editing: the image each group was edited from
    encoded_sources: list[bytes | None] | None = None  # once per step (`encode_sources`)
    path: str = "/v1/score"

    def sizes(self) -> list[int]:
        return [len(g) for g in self.groups]

    def source(self, g: int) -> bytes | None:
        assert self.encoded_sources is not None or self.sources[g] is None, "sources are encoded before sending"
        return self.encoded_sources[g] if self.encoded_sources is not None else None

    @property
    def keys(self) -> list[Hashable | None]:
        """Each group's GRPO key, by the service's own rule (prompt, and the source's bytes)."""
        return [group_key(p, self.source(g)) for g, p in enumerate(self.prompts)]

    def images(self, g: int, i: int) -> list[Any]:
        return [self.groups[g][i]]

    def label(self, g: int, i: int, j: int) -> str:
        return f"images[{g}][{i}]"

    def body(self, parts: list[Part], enc: Encoded, multipart: bool) -> tuple[bytes, str]:
        """The request's body and Content-Type."""
        body = Body(multipart)
        req = ScoreRequest(groups=[
            ScoreGroup(prompt=self.prompts[p.group], questions=self.questions[p.group], metadata=self.metadata[p.group],
                       images=[body.image(enc[(p.group, i)][0]) for i in range(p.start, p.stop)],
                       source=None if (s := self.source(p.group)) is None else body.image(s))
            for p in parts
        ], **self.options)
        return body.encode(req)


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

    def body(self, parts: list[Part], enc: Encoded, multipart: bool) -> tuple[bytes, str]:
        body = Body(multipart)
        req = VerifyRequest(items=[VerifyItemIn(images=[body.image(x) for x in enc[(0, i)]],
                                                questions=self.questions[i])
                                   for p in parts for i in range(p.start, p.stop)])
        return body.encode(req)


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
    if on_error in ("raise", "nan", "neutral"):
        return cast(OnError, on_error)
    raise ValueError(f"on_error must be 'raise', 'nan' or 'neutral', got {on_error!r}")


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
              tag_weights: Mapping[str, float] | None, details: bool, answer: Answer,
              sources: Sequence[Any | None] | None = None) -> ScoreJob:
    not_str_seq("prompts", prompts)
    not_str_seq("images", images)
    n = len(prompts)
    _checked_len("images", images, n)
    _checked_len("questions", questions, n)
    _checked_len("metadata", metadata, n)
    _checked_len("sources", sources, n)
    if sources is not None:
        not_str_seq("sources", sources)
    if n == 0:
        raise ValueError("nothing to score: prompts is empty")
    groups = [split_group(g, f"images[{i}]") for i, g in enumerate(images)]
    for i, g in enumerate(groups):
        if not g:
            raise ValueError(f"images[{i}] is an empty group")
    qs = [None if q is None else [_as_question(x) for x in q] for q in (questions or [None] * n)]
    for i, (p, q) in enumerate(zip(prompts, qs, strict=True)):
        if not q and not (isinstance(p, str) and not blank(p)):
            raise ValueError(f"group {i}: give a non-empty prompt or explicit questions")
        if q:
            try:
                validate_questions(q)
            except DecompositionError as exc:
                raise ValueError(f"questions[{i}]: {exc}") from None
    options = {"aggregation": Aggregation(aggregation), "gating": Gating(gating),
               "tag_weights": dict(tag_weights) if tag_weights is not None else None,
               "advantages": AdvantageOptions(std=advantages_std, clip=clip, eps=eps), "details": details,
               "answer": answer}
    return ScoreJob(groups, list(prompts), qs, [dict(m or {}) for m in (metadata or [None] * n)], options,
                    list(sources) if sources is not None else [None] * n)


def source_work(job: ScoreJob) -> EncodeWork:
    """The groups' source images to encode (once per step: every request of a group sends the same one)."""
    return [(s, f"sources[{g}]") for g, s in enumerate(job.sources) if s is not None]


def set_sources(job: ScoreJob, encoded: Iterable[bytes]) -> None:
    it = iter(encoded)
    job.encoded_sources = [None if s is None else next(it) for s in job.sources]


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


def collect(keys: list[tuple[int, int, int]], encoded: Iterable[bytes]) -> Encoded:
    out: Encoded = {}
    for (g, i, _j), s in zip(keys, encoded, strict=True):
        out.setdefault((g, i), []).append(s)
    return out


def subrequests(job: Job, parts: list[Part], enc: Encoded, max_request_bytes: int,
                multipart: bool) -> list[list[Part]]:
    """Requests under the byte limit, in the form they are sent; a group's source counts with each of its images
    (an upper bound)."""
    def size(g: int, i: int) -> int:
        source = job.source(g) if isinstance(job, ScoreJob) else None
        images = [*enc[(g, i)], *([source] if source is not None else [])]
        return sum(wire_size(len(b), multipart) for b in images) + 64

    return split_by_bytes(parts, size, max_request_bytes)


# ---- merging answers -------------------------------------------------------------------------


def merge_score(job: ScoreJob, sent: list[Sent[ScoreResponse]], wall_s: float, on_error: OnError) -> ScoreResult:
    """The step's result from its requests' answers; advantages always over the whole step."""
    groups, by_image = _assemble(job, sent)
    warnings = [w for s in sent for w in request_warnings(s.response, [p.group for p in s.parts])]
    response = step_response(groups, job.keys, [s.response for s in sent], job.options["advantages"], warnings)
    sources = job.encoded_sources if any(s is not None for s in job.sources) else None
    return score_result(response, [s.response.request_id for s in sent], any(s.replayed for s in sent), wall_s,
                        on_error, job.keys, by_image, sources)


def score_result(response: ScoreResponse, request_ids: list[str], replayed: bool, wall_s: float,
                 on_error: OnError, keys: list[Hashable | None], image_requests: list[list[str]],
                 sources: list[bytes | None] | None = None) -> ScoreResult:
    """The failures listed once, and raised as ImageFailed when that is the policy."""
    failures = []
    for g, gr in enumerate(response.groups):
        for i, (r, err) in enumerate(zip(gr.rewards, gr.errors, strict=True)):
            if r is None:
                failures.append(ImageFailure(g, i, err.code if err else "failed",
                                             err.message if err else "no reward, and the service gave no reason"))
    result = ScoreResult(response, request_ids, replayed, wall_s, failures, on_error, keys, image_requests, sources)
    if failures and on_error == "raise":
        raise ImageFailed(failures, result, request_id=response.request_id)
    return result


def request_warnings(response: ScoreResponse, groups: list[int]) -> list[Warning]:
    """One request's warnings with its group indices mapped to the step's (`groups[i]` is request group i's).

    Lone-image warnings are left out: only the whole step can tell (see `lone_image_warnings`).
    """
    return [w.model_copy(update={"group": None if w.group is None else groups[w.group]})
            for w in response.warnings if w.code != "lone_image"]


def _assemble(job: ScoreJob, sent: list[Sent[ScoreResponse]]) -> tuple[list[GroupResult], list[list[str]]]:
    """Each group of the job, put together from the requests that carried its parts (advantages come later),
    and per image the id of the request that scored it."""
    n = len(job.groups)
    head: list[GroupResult | None] = [None] * n
    rewards: list[list[float | None]] = [[None] * len(g) for g in job.groups]
    errors: list[list[ErrorInfo | None]] = [[None] * len(g) for g in job.groups]
    images: list[list[ImageResult | None]] = [[None] * len(g) for g in job.groups]
    by_image: list[list[str]] = [[""] * len(g) for g in job.groups]
    for s in sent:
        if len(s.response.groups) != len(s.parts):
            raise ScoringError(f"request {s.response.request_id}: sent {len(s.parts)} groups, got "
                               f"{len(s.response.groups)} back", code="bad_response")
        for part, gr in zip(s.parts, s.response.groups, strict=True):
            g, size = part.group, part.stop - part.start
            if len(gr.rewards) != size or len(gr.errors) != size:
                raise ScoringError(f"group {g}: sent {size} images, got {len(gr.rewards)} rewards and "
                                   f"{len(gr.errors)} errors", code="bad_response")
            h = head[g]
            if h is None:
                head[g] = gr
            elif gr.questions != h.questions:
                raise ScoringError(f"group {g} was split across requests (chunk_images < group size) and its parts "
                                   "got different questions; pass explicit questions or raise chunk_images",
                                   code="inconsistent")
            rewards[g][part.start:part.stop] = gr.rewards
            errors[g][part.start:part.stop] = gr.errors
            by_image[g][part.start:part.stop] = [s.response.request_id] * size
            for im in gr.images or ():
                images[g][part.start + im.index] = im.model_copy(update={"index": part.start + im.index})
    out = []
    for g, h in enumerate(head):
        assert h is not None, "every group of a job is sent"
        out.append(h.model_copy(update={
            "rewards": rewards[g], "errors": errors[g], "advantages": [],
            "images": [im for im in images[g] if im is not None] if job.options["details"] else None}))
    return out, by_image


def _verified(response: ScoreResponse) -> bool:
    """Whether a worker verified some image of this request: only then do its model ids name the verifier."""
    return any(r is not None for g in response.groups for r in g.rewards)


def step_response(groups: list[GroupResult], keys: list[Hashable | None], responses: list[ScoreResponse],
                  options: AdvantageOptions, warnings: list[Warning]) -> ScoreResponse:
    """One response for a step scored by several requests: step-wide advantages, one set of model ids.

    The requests must agree on what matters: those that verified images on the verifier (name and digest)
    and template version, those that decomposed prompts on the decomposer. A request whose groups all
    brought their questions reports no decomposer, and one that verified nothing reports the API's
    defaults; neither makes a step inconsistent.
    """
    verified = [r for r in responses if _verified(r)] or responses[:1]
    decomposed = [r for r in responses if r.models.decomposer is not None]
    first, dec = verified[0], decomposed[0].models if decomposed else None
    for r in verified[1:]:
        if (r.models.verifier, r.template_version) != (first.models.verifier, first.template_version):
            raise ScoringError("requests of one step were verified by different verifiers or templates "
                               f"({first.models.verifier} {first.template_version} vs {r.models.verifier} "
                               f"{r.template_version}); rescore the step", code="inconsistent")
    for r in decomposed[1:]:
        d = decomposed[0].models
        if (r.models.decomposer, r.models.pipeline) != (d.decomposer, d.pipeline):
            raise ScoringError("requests of one step were decomposed by different decomposers "
                               f"({d} vs {r.models}); rescore the step", code="inconsistent")
    rewards = [g.rewards for g in groups]
    adv = group_advantages(rewards, std=options.std, eps=options.eps, clip=options.clip, keys=keys)
    unique = {w.model_dump_json(): w for w in warnings}
    t = [r.timings for r in responses]
    return ScoreResponse.model_construct(
        request_id=responses[0].request_id,
        models=ModelIds(verifier=first.models.verifier, decomposer=dec.decomposer if dec else None,
                        pipeline=dec.pipeline if dec else None),
        template_version=first.template_version, verifier_system_prompt=first.verifier_system_prompt,
        aggregation=first.aggregation, gating=first.gating, answer=first.answer,
        groups=[g.model_copy(update={"advantages": a}) for g, a in zip(groups, adv, strict=True)],
        warnings=list(unique.values()) + lone_image_warnings(rewards, keys),
        # requests ran concurrently: the slowest one
        timings=Timings(decompose_ms=max(x.decompose_ms for x in t), verify_ms=max(x.verify_ms for x in t),
                        total_ms=max(x.total_ms for x in t)),
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
