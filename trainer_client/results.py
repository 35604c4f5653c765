"""Trainer-friendly views of scored responses: a failed image is NaN or its group's mean here, never 0."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal

from dvreward_protocol.grpo import neutral_rewards
from dvreward_protocol.questions import Question
from dvreward_protocol.reflection import FEEDBACK_TEMPLATE, Rectified, feedback
from dvreward_protocol.schemas import GroupResult, ImageResult, ModelIds, ScoreResponse, Timings, VerifyResponse
from trainer_client.errors import ImageFailure

NAN = float("nan")
# What a failed image becomes: "raise" raises ImageFailed (the result rides on it); "nan" is NaN; "neutral" is
# the mean of its GRPO group's scored rewards, with advantage 0 (no gradient from it).
OnError = Literal["raise", "nan", "neutral"]


def _nan(x: float | None) -> float:
    return NAN if x is None else x


@dataclass
class ScoreResult:
    """A scored step: the (merged) wire response plus trainer-friendly views of it.

    Failed images are listed in `failures` and appear in the views as `on_error` says: NaN, or (neutral)
    their group's mean reward, SC and PQ with advantage 0. The wire response keeps null.
    """

    response: ScoreResponse
    request_ids: list[str]
    replayed: bool  # some request was answered from an earlier attempt (Idempotent-Replayed)
    wall_s: float
    failures: list[ImageFailure] = field(default_factory=list)
    on_error: OnError = "nan"
    keys: list[Hashable | None] | None = None  # GRPO group keys (prompt, and source for editing); None: prompts
    image_request_ids: list[list[str]] | None = None  # per group, per image: the request that scored it
    sources: list[bytes | None] | None = None  # editing: each group's source image as sent; None: no group had one

    @property
    def request_id(self) -> str:
        return self.response.request_id

    @property
    def groups(self) -> list[GroupResult]:
        return self.response.groups

    @property
    def prompts(self) -> list[str | None]:
        return [g.prompt for g in self.groups]

    def _view(self, values: list[list[float | None]]) -> list[list[float]]:
        if self.on_error == "neutral" and self.failures:
            return neutral_rewards(values, keys=self.keys if self.keys is not None else self.prompts)
        return [[_nan(x) for x in g] for g in values]

    @property
    def rewards(self) -> list[list[float]]:
        """Per group, per image; a failed image is NaN, or its group's mean with on_error="neutral" (never 0)."""
        return self._view([list(g.rewards) for g in self.groups])

    @property
    def advantages(self) -> list[list[float]]:
        """The step's GRPO advantages; a failed image's is NaN, or exactly 0 with on_error="neutral"."""
        zero = self.on_error == "neutral"
        return [[(0.0 if zero else NAN) if a is None else a for a in g.advantages] for g in self.groups]

    @property
    def sc(self) -> list[list[float]]:
        """Mean semantic p per image (empty lists when details=False); failed images as in `rewards`."""
        return self._view([[im.sc for im in g.images or ()] for g in self.groups])

    @property
    def pq(self) -> list[list[float]]:
        return self._view([[im.pq for im in g.images or ()] for g in self.groups])

    @property
    def neutral(self) -> list[tuple[int, int]]:
        """(group, index) of the images given a neutral value in the views (on_error="neutral")."""
        return [(f.group, f.index) for f in self.failures] if self.on_error == "neutral" else []

    @property
    def questions(self) -> list[list[Question]]:
        return [g.questions for g in self.groups]

    @property
    def images(self) -> list[list[ImageResult]]:
        """Per-image details (p per question, failed ids, error); empty lists when details=False."""
        return [list(g.images or ()) for g in self.groups]

    @property
    def timings(self) -> Timings:
        return self.response.timings

    @property
    def models(self) -> ModelIds:
        return self.response.models

    def flat_rewards(self) -> list[float]:
        return [r for g in self.rewards for r in g]

    def flat_advantages(self) -> list[float]:
        return [a for g in self.advantages for a in g]

    def failed_questions(self) -> list[list[list[str]]]:
        """Texts of the questions each image failed (p <= 0.5): feedback for self-reflective refinement."""
        out = []
        for g in self.groups:
            text = {q.id: q.text for q in g.questions}
            out.append([[text[q] for q in im.failed] for im in g.images or ()])
        return out

    def feedback(self, template: str = FEEDBACK_TEMPLATE) -> list[list[str]]:
        """Per image, its failed questions in order as one text for a reflection prompt ("" if none failed);
        `template` (our wording by default) receives them as {failed}."""
        return [[feedback(texts, template) for texts in g] for g in self.failed_questions()]


@dataclass
class RefinedResult:
    """Refinements scored against their stage-1 questions, then rectified: a refinement that does not beat its
    starting image gets the lowest starting reward of its group. Failed images are NaN."""

    result: ScoreResult  # the refinements as scored, before rectification
    start: list[list[float]]  # each refinement's starting (stage-1) reward
    rectified: Rectified

    @property
    def rewards(self) -> list[list[float]]:
        return [[_nan(r) for r in g] for g in self.rectified.rewards]

    @property
    def advantages(self) -> list[list[float]]:
        return [[_nan(a) for a in g] for g in self.rectified.advantages]

    @property
    def improved(self) -> list[list[bool]]:
        return self.rectified.improved

    @property
    def any_improved(self) -> bool:
        """False when no refinement improved on its start: the reference skips such a step."""
        return self.rectified.any_improved


@dataclass
class VerifyResult:
    """P(yes) per item and question; NaN for every question of a failed item."""

    response: VerifyResponse
    request_ids: list[str]
    replayed: bool
    wall_s: float
    n_questions: list[int]
    failures: list[ImageFailure] = field(default_factory=list)

    @property
    def p(self) -> list[list[float]]:
        return [r.p if r.p is not None else [NAN] * n
                for r, n in zip(self.response.results, self.n_questions, strict=True)]

