"""Summary and report arithmetic on fixed p values (no model): absent halves, and the parent that zeroed a p."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dvreward_protocol.questions import Question
from dvreward_protocol.reward import Aggregation, Gating
from server.eval.importers.base import PromptRecord
from server.eval.matching import ImageJob, Matching
from server.eval.report import render_html
from server.eval.summary import build_record, summarize

SEMANTIC = (Question(id="cat", text="Is there a cat?", tag="Existence"),
            Question(id="red", text="Is the cat red?", tag="Attribute", depends_on=("cat",)),
            Question(id="sofa", text="Is there a sofa?", tag="Existence"))
QUALITY = (Question(id="q", text="Is the cat well drawn?", kind="quality", tag="Anatomy"),)


def _run(items: dict[str, PromptRecord], p: dict[str, list[float]], gating: Gating = Gating.hard,
         aggregation: Aggregation = Aggregation.geometric) -> tuple[dict, list[dict]]:
    jobs = [ImageJob(i, f"{i}.png", Path(f"/nonexistent/{i}.png")) for i in items]
    records = [build_record(j, items[j.item_id], p[j.item_id], None, gating, aggregation, "m") for j in jobs]
    return summarize(records, items, Matching(jobs=jobs), gating=gating, aggregation=aggregation), records


def test_without_quality_questions_the_summary_leads_with_sc() -> None:
    items = {"a": PromptRecord("a", "a red cat", SEMANTIC[:1], "dsg")}
    summary, (record,) = _run(items, {"a": [0.24]})
    assert record["reward"] == pytest.approx(math.sqrt(0.24))  # 0.49: what the note warns about
    o = summary["overall"]
    assert (o["lead"], o["sc"], o["pq"]) == ("sc", pytest.approx(0.24), None)
    assert summary["notes"] == ["no quality questions: PQ is 1 by definition, so every reward is sqrt(SC) "
                                "(0.24 reads 0.49); read SC, not the reward"]
    assert "(SC + 1) / 2" in _run(items, {"a": [0.24]}, aggregation=Aggregation.mean)[0]["notes"][0]
    assert _run(items, {"a": [0.24]}, aggregation=Aggregation.flat)[0]["notes"] == []  # flat is not lifted


def test_quality_only_leads_with_pq_and_mixed_runs_are_counted() -> None:
    only_q = {"a": PromptRecord("a", "x", QUALITY, "hand")}
    summary, _ = _run(only_q, {"a": [0.3]})
    assert (summary["overall"]["lead"], summary["overall"]["sc"]) == ("pq", None)
    mixed = {"a": PromptRecord("a", "x", SEMANTIC[:1] + QUALITY, "hand"), "b": PromptRecord("b", "y", SEMANTIC[:1],
                                                                                            "dsg")}
    summary, _ = _run(mixed, {"a": [0.5, 0.5], "b": [0.5]})
    assert summary["overall"]["lead"] == "reward" and summary["halves"] == {"semantic": 2, "quality": 1}
    (note,) = summary["notes"]
    assert note.startswith("1 of 2 scored images had no quality questions")


def test_hard_gating_names_the_parent_that_zeroed_a_p() -> None:
    items = {"a": PromptRecord("a", "a red cat on a sofa", SEMANTIC, "dsg")}
    summary, (record,) = _run(items, {"a": [0.3, 0.9, 0.8]})
    by_id = {q["id"]: q for q in record["questions"]}
    assert (by_id["red"]["gated_p"], by_id["red"]["zeroed_by"]) == (0.0, "cat")
    assert by_id["cat"]["zeroed_by"] is None and by_id["sofa"]["zeroed_by"] is None
    html = render_html(summary, [record])
    assert "zeroed by parent" in html and "<td>cat: Is there a cat? (p 0.300)</td>" in html
    _, (kept,) = _run(items, {"a": [0.7, 0.9, 0.8]})
    assert all(q["zeroed_by"] is None for q in kept["questions"])  # a parent answered yes zeroes nothing
    _, (soft,) = _run(items, {"a": [0.3, 0.9, 0.8]}, gating=Gating.soft)
    assert all(q["zeroed_by"] is None for q in soft["questions"])  # soft gating scales, never zeroes
    assert "zeroed by parent" not in render_html(summary, [soft])


def test_a_tie_fails_in_accuracy_and_zeroes_children_as_it_is_listed_failed() -> None:
    """p = .5 counted as passed here (p >= .5) and gated nothing, while /v1/score listed it failed: one rule now."""
    tagged = tuple(q.model_copy(update={"metadata": {"category_broad": "entity"}}) for q in SEMANTIC)
    items = {"a": PromptRecord("a", "a red cat on a sofa", tagged, "dsg")}
    summary, (record,) = _run(items, {"a": [0.5, 0.9, 0.5]})
    by_id = {q["id"]: q for q in record["questions"]}
    assert (by_id["red"]["gated_p"], by_id["red"]["zeroed_by"]) == (0.0, "cat")
    assert summary["benchmark"]["category_broad"]["categories"]["entity"]["accuracy"] == 0.0
