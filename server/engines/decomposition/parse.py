"""Parsing and assembling decomposer output: pure functions, no torch.

Constrained output from the transformers engine and unconstrained output of a remote model go
through the same rules, and tests feed them hand-written outputs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import UnionType
from typing import Any

from pydantic import ValidationError

from dvreward_protocol.answers import answered_yes
from dvreward_protocol.questions import (
    Decomposition,
    DecompositionError,
    Kind,
    Question,
    find_cycle,
)
from server.engines.decomposition.schema import DSG_CATEGORIES
from server.engines.prompts import render_tuple
from server.errors import validation_problems

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


@dataclass(frozen=True)
class Generation:
    """One decoded output; ``finished`` is False when max_new_tokens cut it short.

    ``error`` says why there is no output at all (a remote request that failed).
    """

    text: str
    finished: bool
    n_tokens: int
    error: str | None = None


def require_finished(gen: Generation, what: str, max_new_tokens: int) -> str:
    """A cut-off output must fail loudly: a prefix of valid JSON is not a smaller valid answer."""
    if gen.error is not None:
        raise ValueError(f"{what}: no output: {gen.error}")
    if not gen.finished:
        raise ValueError(
            f"{what} output truncated: the model did not finish within max_new_tokens={max_new_tokens} "
            f"({gen.n_tokens} tokens generated); raise max_new_tokens"
        )
    return gen.text


def load_json_object(text: str, what: str) -> dict[str, Any]:
    """Parse one JSON object, tolerating a Markdown code fence around it."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON in {what} output: {e.msg} at char {e.pos}: {body[:80]!r}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} output must be a JSON object, got {type(data).__name__}")
    return data


def _field(data: Mapping[str, Any], key: str, typ: type | UnionType, where: str) -> Any:
    if key not in data:
        raise ValueError(f"{where}: missing field {key!r}")
    value = data[key]
    if not isinstance(value, typ) or isinstance(value, bool):
        raise ValueError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _items(data: Mapping[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    items = _field(data, key, list, where)
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{where}: {key}[{n}] must be an object, got {type(item).__name__}")
    return items


def _ids(values: Any, where: str) -> tuple[str, ...]:
    if not isinstance(values, list) or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{where}: expected a list of ids")
    return tuple(dict.fromkeys(str(v) for v in values))


def _question(where: str, **fields: Any) -> Question:
    """Build a Question, turning pydantic's verbose error into one clear line."""
    try:
        return Question(**fields)
    except ValidationError as e:
        raise ValueError(f"{where}: {validation_problems(e)[0]}") from None


def _decomposition(prompt: str, questions: list[Question], **meta: Any) -> Decomposition:
    try:
        return Decomposition(prompt=prompt, questions=tuple(questions), **meta)
    except ValidationError as e:
        raise DecompositionError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None


def _quality_questions(data: Mapping[str, Any], what: str) -> list[Question]:
    out = []
    for n, item in enumerate(_items(data, "quality", what)):
        where = f"{what}: quality[{n}]"
        out.append(_question(where, id=str(_field(item, "id", str | int, where)), kind=Kind.quality,
                             text=_field(item, "text", str, where), tag=_field(item, "aspect", str, where)))
    return out


def parse_fast_output(text: str, prompt: str = "", **meta: Any) -> Decomposition:
    """Parse the one-shot JSON into a validated Decomposition; ValueError says what is wrong.

    ``meta`` (pipeline, model, template_version) is passed to the Decomposition.
    """
    what = "decomposition"
    data = load_json_object(text, what)
    semantic = []
    for n, item in enumerate(_items(data, "semantic", what)):
        where = f"{what}: semantic[{n}]"
        semantic.append(_question(
            where, id=str(_field(item, "id", str | int, where)), text=_field(item, "text", str, where),
            tag=_field(item, "tag", str, where), depends_on=_ids(item.get("depends_on", []), where)))
    if not semantic:
        raise ValueError(f"{what}: no semantic questions")
    quality = _quality_questions(data, what)
    return _decomposition(prompt, semantic + quality, **{"pipeline": "fast", **meta})


@dataclass(frozen=True)
class DSGTuple:
    """One Davidsonian scene-graph fact, e.g. attribute - color (cat, black)."""

    id: str
    category: str
    type: str
    args: tuple[str, ...]

    def render(self) -> str:
        return render_tuple(self.id, self.category, self.type, self.args)


def parse_tuples(text: str) -> list[DSGTuple]:
    """Stage 1: a non-empty list of tuples with unique ids and known categories."""
    what = "DSG tuples"
    out: list[DSGTuple] = []
    for n, item in enumerate(_items(load_json_object(text, what), "tuples", what)):
        where = f"{what}: tuples[{n}]"
        tid = str(_field(item, "id", str | int, where))
        category = _field(item, "category", str, where)
        if category not in DSG_CATEGORIES:
            raise ValueError(f"{where}: unknown category {category!r}; expected one of {', '.join(DSG_CATEGORIES)}")
        args = _field(item, "args", list, where)
        if not args or not all(isinstance(a, str) and a.strip() for a in args):
            raise ValueError(f"{where}: args must be a non-empty list of non-blank strings")
        if tid in {t.id for t in out}:
            raise ValueError(f"{where}: duplicate tuple id {tid!r}")
        out.append(DSGTuple(tid, category, _field(item, "type", str, where).strip(), tuple(a.strip() for a in args)))
    if not out:
        raise ValueError(f"{what}: no tuples")
    return out


def _one_per_id(items: list[dict[str, Any]], ids: Sequence[str], what: str) -> dict[str, dict[str, Any]]:
    """Map items to the expected ids: each exactly once, none unknown."""
    by_id: dict[str, dict[str, Any]] = {}
    for n, item in enumerate(items):
        tid = str(_field(item, "id", str | int, f"{what}[{n}]"))
        if tid not in ids:
            raise ValueError(f"{what}[{n}]: unknown tuple id {tid!r}")
        if tid in by_id:
            raise ValueError(f"{what}[{n}]: tuple id {tid!r} given twice")
        by_id[tid] = item
    missing = [t for t in ids if t not in by_id]
    if missing:
        raise ValueError(f"{what}: no entry for tuple(s) {', '.join(missing)}")
    return by_id


def parse_dependencies(text: str, ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Stage 2: parents for every tuple; unknown, self or cyclic references are errors."""
    what = "DSG dependencies"
    by_id = _one_per_id(_items(load_json_object(text, what), "dependencies", what), ids, what)
    deps: dict[str, tuple[str, ...]] = {}
    for tid in ids:
        parents = _ids(by_id[tid].get("parents", []), f"{what}: {tid}")
        bad = [p for p in parents if p not in ids or p == tid]
        if bad:
            raise ValueError(f"{what}: {tid} has invalid parent(s) {', '.join(bad)}")
        deps[tid] = parents
    cycle = find_cycle(deps)
    if cycle:
        raise ValueError(f"{what}: dependency cycle " + " -> ".join(cycle))
    return deps


def parse_dsg_questions(text: str, ids: Sequence[str]) -> dict[str, str]:
    """Stage 3: one non-blank question per tuple."""
    what = "DSG questions"
    by_id = _one_per_id(_items(load_json_object(text, what), "questions", what), ids, what)
    out = {}
    for tid in ids:
        q = _field(by_id[tid], "text", str, f"{what}: {tid}").strip()
        if not q:
            raise ValueError(f"{what}: {tid} has an empty question")
        out[tid] = q
    return out


def parse_tag(text: str, kind: Kind = Kind.semantic) -> str:
    """Stage 5: exactly one known tag, tolerating quotes, case and a trailing full stop."""
    from dvreward_protocol.questions import TAGS_BY_KIND

    word = text.strip().strip("\"'`.: \t\n")
    for tag in TAGS_BY_KIND[kind]:
        if word.lower() == tag.lower():
            return tag
    raise ValueError(f"tag {word[:40]!r} is not one of {', '.join(TAGS_BY_KIND[kind])}")


def parse_quality(text: str) -> list[Question]:
    """Stage 6: the quality questions (possibly none)."""
    what = "quality questions"
    return _quality_questions(load_json_object(text, what), what)


def is_required(p_yes: float) -> bool:
    """Stage 4's verdict: the model must prefer yes to keep the question."""
    return answered_yes(p_yes)


def parse_reason(text: str) -> str:
    """Stage 4's explanation of a rejected question: {"reason": "..."}."""
    reason = _field(load_json_object(text, "DSG validity reason"), "reason", str, "DSG validity reason")
    if not reason.strip():
        raise ValueError("DSG validity reason: blank reason")
    return reason.strip()


def check_validity(questions: Mapping[str, str], verdicts: Mapping[str, bool],
                   reasons: Mapping[str, str] | None = None) -> None:
    """The published rule: one question judged not required rejects the whole decomposition (reasons quoted)."""
    why = reasons or {}
    rejected = [f"{qid} ({text!r}" + (f": {why[qid]}" if qid in why else "") + ")"
                for qid, text in questions.items() if not verdicts[qid]]
    if rejected:
        raise DecompositionError("question(s) judged not strictly required by the prompt: " + "; ".join(rejected))


def assemble_dsg(
    prompt: str,
    tuples: Sequence[DSGTuple],
    dependencies: Mapping[str, tuple[str, ...]],
    questions: Mapping[str, str],
    verdicts: Mapping[str, bool],
    tags: Mapping[str, str],
    quality: Sequence[Question],
    **meta: Any,
) -> Decomposition:
    """Join the six stages' outputs into one validated Decomposition (or DecompositionError)."""
    check_validity(questions, verdicts)
    semantic = [
        _question(f"DSG question {t.id}", id=t.id, text=questions[t.id], tag=tags[t.id],
                  depends_on=dependencies[t.id], metadata={"dsg_tuple": t.render()})
        for t in tuples
    ]
    return _decomposition(prompt, semantic + list(quality), **{"pipeline": "dsg", **meta})

