"""Per-image records of results.jsonl, and the summary over them.

Means are over scored images only: a failed image (reward null + error) is counted, listed and
left out of every mean. Semantic tags and quality aspects use the run's gating; the
benchmark's own categories (question metadata: DSG `category_broad` / `category_detailed`,
i.e. DPG-Bench L1 / L2, GenEval `geneval_tag`, TIFA `element_type`) always use hard
dependency gating, as DSG and DPG-Bench score them (identical to no gating where the source
has no dependencies). `accuracy` counts a question as passed when its gated p reads yes (`answered_yes`);
GenEval's own metric is per image (every question passed): `image_accuracy`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dvreward_protocol.answers import answered_yes
from dvreward_protocol.questions import QUALITY_ASPECTS, SEMANTIC_TAGS, Kind, Question
from dvreward_protocol.reward import Aggregation, Gating, gate, score_image
from server.eval.importers.base import PromptRecord
from server.eval.matching import ImageJob, Matching

BENCHMARK_KEYS: tuple[str, ...] = ("category_broad", "category_detailed", "geneval_tag", "element_type")
BENCHMARK_LABELS: dict[str, str] = {
    "category_broad": "DSG category_broad (DPG-Bench L1)",
    "category_detailed": "DSG category_detailed (DPG-Bench L2)",
    "geneval_tag": "GenEval tag",
    "element_type": "TIFA element type",
}
PER_IMAGE_KEYS: frozenset[str] = frozenset({"geneval_tag"})  # one value per prompt: also scored per image


def build_record(
    job: ImageJob, item: PromptRecord, p: Sequence[float] | None, error: str | None,
    gating: Gating, aggregation: Aggregation, model: str | None,
) -> dict[str, Any]:
    """One line of results.jsonl; a failed image has reward, sc, pq and every p null, and an error."""
    breakdown = None
    if error is None and p is not None:
        try:
            breakdown = score_image(item.questions, p, aggregation, gating).breakdown
        except ValueError as e:
            error = f"cannot aggregate the scores: {e}"
    elif error is None:
        error = "no scores"
    questions = []
    for i, q in enumerate(item.questions):
        ok = breakdown is not None and p is not None
        gated = breakdown.gated_p if ok and breakdown is not None else None
        questions.append({
            "id": q.id, "text": q.text, "kind": q.kind.value, "tag": q.tag,
            "p": float(p[i]) if ok and p is not None else None,
            "gated_p": gated[q.id] if gated is not None else None,
            "zeroed_by": _zeroed_by(q, gated) if gated is not None and Gating(gating) is Gating.hard else None,
        })
    return {
        "item_id": job.item_id,
        "image": job.image,
        "image_path": str(job.path),
        "sample": job.sample,
        "source_image": str(job.source) if job.source else None,
        "prompt": item.prompt,
        "source": item.source,
        "questions": questions,
        "reward": breakdown.reward if breakdown else None,
        "sc": breakdown.sc if breakdown else None,
        "pq": breakdown.pq if breakdown else None,
        "error": None if breakdown else error,
        "model": model,
        "gating": Gating(gating).value,
        "aggregation": Aggregation(aggregation).value,
    }


def _zeroed_by(q: Question, gated: Mapping[str, float]) -> str | None:
    """Under hard gating, the parent answered "no" that set this question's gated p to 0."""
    return next((parent for parent in q.depends_on if not answered_yes(gated.get(parent, 1.0))), None)


class _Mean:
    __slots__ = ("total", "n", "passed")

    def __init__(self) -> None:
        self.total, self.n, self.passed = 0.0, 0, 0

    def add(self, v: float) -> None:
        self.total += v
        self.n += 1
        self.passed += answered_yes(v)

    def mean(self) -> float | None:
        return self.total / self.n if self.n else None


def _ordered(groups: Mapping[str, _Mean], order: Sequence[str] = ()) -> list[str]:
    known = [k for k in order if k in groups]
    return known + sorted(k for k in groups if k not in order)


def summarize(
    records: Iterable[dict[str, Any]],
    items: Mapping[str, PromptRecord],
    matching: Matching,
    *,
    gating: Gating,
    aggregation: Aggregation,
    resumed: int = 0,
    scored_this_run: int = 0,
    stale: int = 0,
    complete: bool = True,
) -> dict[str, Any]:
    """summary.json: counts, overall means, p by tag / aspect / benchmark category, and the problems."""
    records = list(records)
    ok = [r for r in records if r.get("error") is None and r.get("reward") is not None]
    failed = [r for r in records if not (r.get("error") is None and r.get("reward") is not None)]
    by_tag: dict[str, _Mean] = defaultdict(_Mean)
    by_aspect: dict[str, _Mean] = defaultdict(_Mean)
    bench: dict[str, dict[str, _Mean]] = defaultdict(lambda: defaultdict(_Mean))
    bench_images: dict[str, dict[str, _Mean]] = defaultdict(lambda: defaultdict(_Mean))
    for r in ok:
        item = items[r["item_id"]]
        qp = {q["id"]: q for q in r["questions"]}
        for q in item.questions:
            (by_tag if q.kind is Kind.semantic else by_aspect)[q.tag].add(qp[q.id]["gated_p"])
        hard = gate(item.questions, {q.id: qp[q.id]["p"] for q in item.questions}, Gating.hard)
        for key in BENCHMARK_KEYS:
            values: set[str] = set()
            for q in item.questions:
                value = q.metadata.get(key)
                if value is None or str(value).strip() == "":
                    continue
                bench[key][str(value).strip()].add(hard[q.id])
                values.add(str(value).strip())
            if key in PER_IMAGE_KEYS and len(values) == 1:
                bench_images[key][values.pop()].add(float(all(answered_yes(v) for v in hard.values())))

    def table(groups: Mapping[str, _Mean], order: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
        return {k: {"mean_p": groups[k].mean(), "n": groups[k].n} for k in _ordered(groups, order)}

    benchmark: dict[str, Any] = {}
    for key in BENCHMARK_KEYS:
        if key not in bench:
            continue
        rows = {}
        for value in _ordered(bench[key]):
            m = bench[key][value]
            row: dict[str, Any] = {"mean_p": m.mean(), "accuracy": m.passed / m.n if m.n else None, "n": m.n}
            if value in bench_images.get(key, {}):
                im = bench_images[key][value]
                row["image_accuracy"], row["n_images"] = im.mean(), im.n
            rows[value] = row
        benchmark[key] = {"label": BENCHMARK_LABELS[key], "gating": Gating.hard.value, "categories": rows}
    halves = _halves([items[r["item_id"]] for r in ok])
    done = {(r["item_id"], r["image"]) for r in records}
    models = sorted({r["model"] for r in records if r.get("model")})
    return {
        "complete": complete,
        "gating": Gating(gating).value,
        "aggregation": Aggregation(aggregation).value,
        "models": models,
        "counts": {
            "items": len(items),
            "items_with_images": len(items) - len(matching.items_without_images),
            "items_without_images": len(matching.items_without_images),
            "images": len(matching.jobs),
            "unmatched_images": len(matching.unmatched),
            "scored": len(ok),
            "errors": len(failed),
            "pending": sum(1 for j in matching.jobs if j.key not in done),
            "resumed": resumed,
            "scored_this_run": scored_this_run,
            "stale_results": stale,
        },
        "overall": {
            "reward": _mean(r["reward"] for r in ok),
            "sc": _mean(r["sc"] for r in ok) if halves["semantic"] else None,
            "pq": _mean(r["pq"] for r in ok) if halves["quality"] else None,
            "n": len(ok),
            "lead": _lead(halves),
        },
        "halves": halves,
        "notes": _notes(halves, Aggregation(aggregation)),
        "by_tag": table(by_tag, SEMANTIC_TAGS),
        "by_aspect": table(by_aspect, QUALITY_ASPECTS),
        "benchmark": benchmark,
        "errors": [{"item_id": r["item_id"], "image": r["image"], "error": r.get("error")} for r in failed],
        "unmatched_images": [{"image": u.image, "reason": u.reason} for u in matching.unmatched],
        "items_without_images": list(matching.items_without_images),
    }


def _halves(scored_items: Sequence[PromptRecord]) -> dict[str, int]:
    """Of the scored images, how many were asked semantic and how many quality questions."""
    return {kind.value: sum(any(q.kind is kind for q in item.questions) for item in scored_items)
            for kind in (Kind.semantic, Kind.quality)}


def _lead(halves: Mapping[str, int]) -> str:
    """The figure a report leads with: the reward only when both halves were asked."""
    if halves["semantic"] and not halves["quality"]:
        return "sc"
    if halves["quality"] and not halves["semantic"]:
        return "pq"
    return "reward"


LIFTED = {Aggregation.geometric: ("sqrt({x})", "0.24 reads 0.49"),
          Aggregation.mean: ("({x} + 1) / 2", "0.24 reads 0.62")}


def _notes(halves: Mapping[str, int], aggregation: Aggregation) -> list[str]:
    """Why a reward may read higher than its evidence: an absent half counts as 1.0 by definition
    (the flat mean over the questions asked is not lifted)."""
    if aggregation not in LIFTED:
        return []
    formula, example = LIFTED[aggregation]
    notes = []
    for kind, other, name, read in (("quality", "semantic", "PQ", "SC"), ("semantic", "quality", "SC", "PQ")):
        if halves[kind] == 0 and halves[other]:
            notes.append(f"no {kind} questions: {name} is 1 by definition, so every reward is "
                         f"{formula.format(x=read)} ({example}); read {read}, not the reward")
        elif 0 < halves[kind] < halves[other]:
            notes.append(f"{halves[other] - halves[kind]} of {halves[other]} scored images had no {kind} questions "
                         f"({name} is 1 by definition for them, their reward {formula.format(x=read)})")
    return notes


def _mean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None
