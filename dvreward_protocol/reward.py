"""Aggregating per-question p into SC, PQ and one reward per image."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from dvreward_protocol.answers import answered_yes, greedy_yes
from dvreward_protocol.questions import Kind, Question, topological_order


class Aggregation(StrEnum):
    geometric = "geometric"  # sqrt(SC * PQ): a zero in either half sinks the reward
    mean = "mean"  # (SC + PQ) / 2
    flat = "flat"  # mean over all questions, ignoring the split


class Gating(StrEnum):
    none = "none"
    hard = "hard"  # DSG / DPG-Bench: a child counts as 0 when a parent is "no" (not `answered_yes`: p <= 0.5)
    soft = "soft"  # a child is multiplied by its parents' gated p


@dataclass(frozen=True)
class RewardBreakdown:
    reward: float
    sc: float
    pq: float
    gated_p: dict[str, float]


def gate(questions: Sequence[Question], p: Mapping[str, float], gating: Gating) -> dict[str, float]:
    """Apply dependency gating; parents are gated first so chains propagate."""
    gating = Gating(gating)  # a plain string ("hard") must not silently mean "no gating"
    if gating is Gating.none:
        return {q.id: p[q.id] for q in questions}
    out: dict[str, float] = {}
    for q in topological_order(list(questions)):
        value = p[q.id]
        for parent in q.depends_on:
            if parent not in out:
                continue
            if gating is Gating.hard and not answered_yes(out[parent]):
                value = 0.0
            elif gating is Gating.soft:
                value *= out[parent]
        out[q.id] = value
    return {q.id: out[q.id] for q in questions}


def _weighted_mean(qs: Sequence[Question], p: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Weights are scaled by their largest first, so no sum can overflow (1e308 + 1e308 is inf)."""
    if not qs:
        return 1.0
    ws = [weights.get(q.tag, 1.0) for q in qs]
    top = max(ws)
    if top <= 0:
        raise ValueError("tag weights of a question set sum to zero")
    ws = [w / top for w in ws]
    return sum(w * p[q.id] for w, q in zip(ws, qs, strict=True)) / sum(ws)


def aggregate(
    questions: Sequence[Question],
    p: Mapping[str, float],
    aggregation: Aggregation = Aggregation.geometric,
    gating: Gating = Gating.none,
    tag_weights: Mapping[str, float] | None = None,
) -> RewardBreakdown:
    """One reward from the p of every question; empty halves count as 1.0."""
    aggregation = Aggregation(aggregation)  # "geometric" as a str must not fall through to flat
    gating = Gating(gating)
    missing = [q.id for q in questions if q.id not in p]
    if missing:
        raise ValueError(f"no p for questions {missing}")
    for qid, v in p.items():
        if not (0.0 <= v <= 1.0) or math.isnan(v):
            raise ValueError(f"p for question {qid!r} is {v}, not a probability")
    weights = dict(tag_weights or {})
    for tag, w in weights.items():
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"tag weight for {tag!r} must be a finite number >= 0, got {w}")
    gp = gate(questions, p, gating)
    sem = [q for q in questions if q.kind is Kind.semantic]
    qual = [q for q in questions if q.kind is Kind.quality]
    sc = _weighted_mean(sem, gp, weights)
    pq = _weighted_mean(qual, gp, weights)
    if aggregation is Aggregation.geometric:
        reward = math.sqrt(sc * pq)
    elif aggregation is Aggregation.mean:
        reward = (sc + pq) / 2
    else:
        reward = _weighted_mean(list(questions), gp, weights)
    return RewardBreakdown(reward=reward, sc=sc, pq=pq, gated_p=gp)


def check_weights(
    questions: Sequence[Question], aggregation: Aggregation, tag_weights: Mapping[str, float] | None
) -> None:
    """Raise ValueError for weights that leave a half of these questions weightless: known before any scoring."""
    aggregate(questions, {q.id: 1.0 for q in questions}, aggregation, Gating.none, tag_weights)


@dataclass(frozen=True)
class ImageScore:
    """An image's reward from its questions' p, and the ids of the questions it was read to fail."""

    breakdown: RewardBreakdown
    failed: list[str]


def score_image(
    questions: Sequence[Question],
    p: Sequence[float],
    aggregation: Aggregation = Aggregation.geometric,
    gating: Gating = Gating.none,
    tag_weights: Mapping[str, float] | None = None,
    answers: Sequence[str] | None = None,
) -> ImageScore:
    """p per question (in order) to the image's reward: the one place the service, `dvreward score` and
    `dvreward eval` turn evidence into rewards. With `answers` (the binary reward), each question counts 1 where
    its greedy answer reads yes, else 0, and fails where it does not; otherwise p counts and fails at p <= 0.5."""
    ids = [q.id for q in questions]
    by_id = dict(zip(ids, p, strict=True))
    if answers is None:
        return ImageScore(aggregate(questions, by_id, aggregation, gating, tag_weights),
                          [q for q in ids if not answered_yes(by_id[q])])
    yes = {q: float(greedy_yes(a)) for q, a in zip(ids, answers, strict=True)}
    return ImageScore(aggregate(questions, yes, aggregation, gating, tag_weights), [q for q in ids if not yes[q]])
