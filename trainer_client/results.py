"""Trainer-friendly views of scored responses: a failed image is NaN here, never 0."""

from __future__ import annotations

from dataclasses import dataclass, field

from dvreward_protocol.questions import Question
from dvreward_protocol.schemas import GroupResult, ImageResult, ModelIds, ScoreResponse, Timings, VerifyResponse
from trainer_client.errors import ImageFailure

NAN = float("nan")


def _nan(x: float | None) -> float:
    return NAN if x is None else x


@dataclass
class ScoreResult:
    """A scored step: the (merged) wire response plus trainer-friendly views where a failed image is NaN."""

    response: ScoreResponse
    request_ids: list[str]
    replayed: bool  # some request was answered from an earlier attempt (Idempotent-Replayed)
    wall_s: float
    failures: list[ImageFailure] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.response.request_id

    @property
    def groups(self) -> list[GroupResult]:
        return self.response.groups

    @property
    def rewards(self) -> list[list[float]]:
        """Per group, per image; NaN (never 0) where the image failed."""
        return [[_nan(r) for r in g.rewards] for g in self.groups]

    @property
    def advantages(self) -> list[list[float]]:
        return [[_nan(a) for a in g.advantages] for g in self.groups]

    @property
    def sc(self) -> list[list[float]]:
        return [[_nan(im.sc) for im in g.images or ()] for g in self.groups]

    @property
    def pq(self) -> list[list[float]]:
        return [[_nan(im.pq) for im in g.images or ()] for g in self.groups]

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
        """Texts of the questions each image failed (p < 0.5): feedback for self-reflective refinement."""
        out = []
        for g in self.groups:
            text = {q.id: q.text for q in g.questions}
            out.append([[text[q] for q in im.failed] for im in g.images or ()])
        return out


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

