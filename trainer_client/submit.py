"""Rewards that arrive while a step is still generating: one group submitted at a time, coalesced into requests,
and a step that merges its groups with step-wide advantages.

The decisions are written once, without I/O: which submissions travel together (`Batcher`), what one group's
answer is (`GroupScore`), and how a step's answers become one result (`merge_step`, the same merge as a
split `score()` call). The clients carry them out with threads or with asyncio.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from dvreward_protocol.grpo import DEFAULT_CLIP, DEFAULT_EPS, DEFAULT_STD, StdMode
from dvreward_protocol.reward import Aggregation, Gating
from dvreward_protocol.schemas import AdvantageOptions, Answer, GroupResult, ScoreResponse, Warning
from trainer_client.errors import ImageFailure
from trainer_client.jobs import QuestionLike, request_warnings, score_result, step_response
from trainer_client.results import OnError, ScoreResult

F = TypeVar("F")  # the future type of the client that carries a submission out


@dataclass(frozen=True)
class GroupOptions:
    """How a submitted group is scored; groups with equal options can share a request."""

    aggregation: Aggregation | str = Aggregation.geometric
    gating: Gating | str = Gating.none
    tag_weights: tuple[tuple[str, float], ...] | None = None
    details: bool = True
    answer: Answer = "prob"

    @classmethod
    def of(cls, aggregation: Aggregation | str, gating: Gating | str, tag_weights: Mapping[str, float] | None,
           details: bool, answer: Answer) -> GroupOptions:
        weights = tuple(sorted(tag_weights.items())) if tag_weights is not None else None
        return cls(Aggregation(aggregation), Gating(gating), weights, details, answer)

    def score_kwargs(self) -> dict[str, Any]:
        return {"aggregation": self.aggregation, "gating": self.gating, "details": self.details,
                "tag_weights": dict(self.tag_weights) if self.tag_weights is not None else None, "answer": self.answer}


@dataclass
class Submission(Generic[F]):
    prompt: str | None
    images: list[Any]
    questions: Sequence[QuestionLike] | None
    metadata: Mapping[str, Any] | None
    source: Any | None
    options: GroupOptions
    future: F


class Batcher(Generic[F]):
    """Submissions wait here until the window closes or a request's worth of images has gathered."""

    def __init__(self, max_images: int) -> None:
        self.max_images = max_images
        self.pending: list[Submission[F]] = []
        self.images = 0

    def add(self, sub: Submission[F]) -> bool:
        """Queue a submission; True when a request's worth is waiting (send now, not at the window's end)."""
        self.pending.append(sub)
        self.images += len(sub.images)
        return self.images >= self.max_images

    def take(self) -> list[list[Submission[F]]]:
        """Everything waiting, one batch per set of options (in submission order)."""
        batches: dict[GroupOptions, list[Submission[F]]] = {}
        for sub in self.pending:
            batches.setdefault(sub.options, []).append(sub)
        self.pending, self.images = [], 0
        return list(batches.values())


@dataclass
class GroupScore:
    """One submitted group, scored. Its advantages belong to the step it is part of (`step().result()`)."""

    group: GroupResult
    response: ScoreResponse  # the answer of the request(s) it travelled in: models, template, system prompt
    key: Hashable | None  # its GRPO group: the prompt (and the source, for editing)
    request_ids: list[str]
    image_request_ids: list[str]
    replayed: bool
    failures: list[ImageFailure] = field(default_factory=list)  # `group` is 0: this group
    warnings: list[Warning] = field(default_factory=list)
    source: bytes | None = None  # editing: the source image as sent

    @property
    def rewards(self) -> list[float]:
        """Per image; NaN (never 0) where the image failed (`failures` says why)."""
        return [math.nan if r is None else r for r in self.group.rewards]


def group_scores(result: ScoreResult) -> list[GroupScore]:
    """A batch's result split into its submitted groups."""
    keys = result.keys if result.keys is not None else list(result.prompts)
    by_image = result.image_request_ids or [[result.request_id] * len(g.rewards) for g in result.groups]
    return [GroupScore(
        group=group, response=result.response, key=keys[g], request_ids=result.request_ids,
        image_request_ids=by_image[g], replayed=result.replayed,
        failures=[ImageFailure(0, f.index, f.code, f.message) for f in result.failures if f.group == g],
        warnings=[w for w in request_warnings(result.response, list(range(len(result.groups)))) if w.group == g],
        source=result.sources[g] if result.sources else None,
    ) for g, group in enumerate(result.groups)]


@dataclass(frozen=True)
class StepOptions:
    advantages_std: StdMode = DEFAULT_STD
    clip: float | None = DEFAULT_CLIP
    eps: float = DEFAULT_EPS

    def advantages(self) -> AdvantageOptions:
        return AdvantageOptions(std=self.advantages_std, clip=self.clip, eps=self.eps)


def merge_step(scored: list[GroupScore], options: StepOptions, on_error: OnError, wall_s: float) -> ScoreResult:
    """The step's result, in submission order, with advantages over all its groups: what one `score()` call on
    the same groups returns."""
    if not scored:
        raise ValueError("the step has no groups: submit some before asking for its result")
    responses = list({s.response.request_id: s.response for s in scored}.values())
    warnings = [w.model_copy(update={"group": g}) for g, s in enumerate(scored) for w in s.warnings]
    keys = [s.key for s in scored]
    response = step_response([s.group for s in scored], keys, responses, options.advantages(), warnings)
    request_ids = list(dict.fromkeys(r for s in scored for r in s.request_ids))
    sources = [s.source for s in scored]
    return score_result(response, request_ids, any(s.replayed for s in scored), wall_s, on_error, keys,
                        [s.image_request_ids for s in scored], sources if any(x is not None for x in sources) else None)
