"""GenEval evaluation metadata (JSONL) -> deterministic yes/no questions.

Each line is `{"tag", "prompt", "include": [...], "exclude": [...]}`; a clause has `class`,
`count` and optionally `color` and `position: [relation, index]`, where index points into
`include`. GenEval reads an include count as "at least N" and an exclude count as "fewer than
N", so include N plus exclude N+1 of one class is an exact count.

Questions are phrased so that "yes" means the image is good; everything that needs an
object (its count, colour, position) depends on that object's existence question.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dvreward_protocol.questions import Question
from server.eval.importers.base import ImportIssue, IssueLog, PromptRecord, read_text

# Nouns the simple English rules get wrong (GenEval itself writes "a skis", "two sheeps").
_NOUN_FORMS: dict[str, tuple[str, str]] = {
    "person": ("person", "people"),
    "sheep": ("sheep", "sheep"),
    "knife": ("knife", "knives"),
    "skis": ("pair of skis", "pairs of skis"),
    "scissors": ("pair of scissors", "pairs of scissors"),
    "computer mouse": ("computer mouse", "computer mice"),
    "mouse": ("mouse", "mice"),
    "broccoli": ("broccoli", "broccoli"),
}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
Clause = dict[str, Any]
AddQuestion = Callable[..., None]  # (qid, text, tag, depends_on, **metadata)

_RELATIONS: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}


def singular(noun: str) -> str:
    return _NOUN_FORMS.get(noun, (noun, ""))[0]


def plural(noun: str) -> str:
    """English plural of a (COCO) class name, inflecting the last word."""
    if noun in _NOUN_FORMS:
        return _NOUN_FORMS[noun][1]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if len(noun) > 1 and noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def with_article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def number(n: int) -> str:
    return _NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else str(n)


def import_geneval(path: str | Path) -> tuple[list[PromptRecord], list[ImportIssue]]:
    """Import GenEval metadata; item_id is the 0-based line index, as GenEval names its outputs."""
    log = IssueLog(str(path))
    source = f"geneval:{Path(path).name}"
    records: list[PromptRecord] = []
    for index, raw in enumerate(read_text(path).split("\n")):  # not splitlines: U+2028 is valid in JSON
        if raw.strip():
            record = _import_line(index + 1, raw, source, log)
            if record is not None:
                records.append(record)
    return records, log.in_file_order()


def _import_line(line: int, raw: str, source: str, log: IssueLog) -> PromptRecord | None:
    try:
        entry = json.loads(raw)
    except json.JSONDecodeError as e:
        log.skip(line, f"invalid JSON: {e.msg}")
        return None
    if not isinstance(entry, dict):
        log.skip(line, "not a JSON object")
        return None
    prompt = entry.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        log.skip(line, "no prompt")
        return None
    gtag = entry.get("tag")
    include = _clauses(entry, "include", line, log)
    exclude = _clauses(entry, "exclude", line, log)
    questions = _questions(include, exclude, str(gtag) if gtag is not None else None, line, log)
    if not questions:
        log.skip(line, "no usable include/exclude clause; prompt skipped")
        return None
    return PromptRecord(item_id=f"{line - 1:05d}", prompt=prompt.strip(), questions=tuple(questions),
                        source=source)


def _clauses(entry: dict[str, Any], key: str, line: int, log: IssueLog) -> list[Clause | None]:
    """The valid clauses under `key`, with None keeping the place of invalid ones (indices matter)."""
    value = entry.get(key, [])
    if not isinstance(value, list):
        log.skip(line, f"{key} is not a list; ignored")
        return []
    out: list[Clause | None] = []
    for i, clause in enumerate(value):
        cls = clause.get("class") if isinstance(clause, dict) else None
        if not isinstance(cls, str) or not cls.strip():
            log.skip(line, f"{key}[{i}] has no class; clause ignored")
            out.append(None)
            continue
        count = _count(clause.get("count", 1), f"{key}[{i}]", line, log)
        if count is None:
            out.append(None)
            continue
        out.append({**clause, "class": cls.strip(), "count": count})
    return out


def _count(value: object, where: str, line: int, log: IssueLog) -> int | None:
    """A positive integer count; a numeric string is repaired, anything else skips the clause."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str) and value.strip().isdigit() and int(value) >= 1:
        log.repair(line, f"{where} count {value!r} read as {int(value)}")
        return int(value)
    log.skip(line, f"{where} has invalid count {value!r}; clause ignored")
    return None


def _questions(
    include: list[Clause | None], exclude: list[Clause | None],
    gtag: str | None, line: int, log: IssueLog,
) -> list[Question]:
    exact = _exact_counts(include, exclude)
    out: list[Question] = []

    def add(qid: str, text: str, tag: str, deps: tuple[str, ...], **meta: Any) -> None:
        try:
            out.append(Question(id=qid, text=text, tag=tag, depends_on=deps,
                                metadata={"geneval_tag": gtag, **meta}))
        except ValidationError as e:
            log.skip(line, f"question {qid} invalid: {e.errors()[0]['msg']}")

    for i, clause in enumerate(include):
        if clause is not None:
            _include_questions(i, clause, include, exact.get(i), add, line, log)
    for j, clause in enumerate(exclude):
        if clause is not None and j not in exact.values():
            _exclude_question(j, clause, include, add)
    return out


def _exact_counts(include: list[Clause | None], exclude: list[Clause | None]) -> dict[int, int]:
    """include index -> exclude index for pairs meaning "exactly N" (include N, exclude N+1)."""
    pairs: dict[int, int] = {}
    for j, ex in enumerate(exclude):
        for i, inc in enumerate(include):
            if (ex and inc and i not in pairs and inc["class"] == ex["class"]
                    and ex["count"] == inc["count"] + 1):
                pairs[i] = j
                break
    return pairs


def _include_questions(
    i: int, clause: Clause, include: list[Clause | None], exact_with: int | None,
    add: AddQuestion, line: int, log: IssueLog,
) -> None:
    cls, n = clause["class"], clause["count"]
    meta = {"clause": f"include[{i}]", "class": cls, "count": n}
    exists = f"exists_{i}"
    add(exists, f"Is there {with_article(singular(cls))}?", "Existence", (), **meta)
    if exact_with is not None:
        text = (f"Is there exactly one {singular(cls)}?" if n == 1
                else f"Are there exactly {number(n)} {plural(cls)}?")
        add(f"count_{i}", text, "Count", (exists,), **meta, exclude=f"exclude[{exact_with}]")
    elif n > 1:
        add(f"count_{i}", f"Are there at least {number(n)} {plural(cls)}?", "Count", (exists,), **meta)
    color = clause.get("color")
    if isinstance(color, str) and color.strip():
        if _ambiguous(clause, include):  # "a red cup and a blue cup": "Is the cup red?" would clash
            text = f"Is there {with_article(color.strip() + ' ' + singular(cls))}?"
        elif n == 1:
            text = f"Is the {singular(cls)} {color.strip()}?"
        else:
            text = f"Are the {plural(cls)} {color.strip()}?"
        add(f"color_{i}", text, "Attribute", (exists,), **meta, color=color.strip())
    elif color is not None:
        log.skip(line, f"include[{i}] color {color!r} is not a colour name; colour question skipped")
    if "position" in clause:
        _position_question(i, clause, include, add, line, log)


def _position_question(
    i: int, clause: Clause, include: list[Clause | None], add: AddQuestion, line: int, log: IssueLog,
) -> None:
    pos = clause["position"]
    j = pos[1] if isinstance(pos, list) and len(pos) == 2 else None
    other = include[j] if isinstance(j, int) and not isinstance(j, bool) and 0 <= j < len(include) else None
    if other is None or j == i or not isinstance(pos[0], str) or not pos[0].strip():
        log.skip(line, f"include[{i}] position {pos!r} does not name another usable include; "
                       "position question skipped")
        return
    relation = pos[0].strip()
    phrase = _RELATIONS.get(relation.lower(), relation)
    verb = "Is" if clause["count"] == 1 else "Are"
    text = f"{verb} {_the(clause, include)} {phrase} {_the(other, include)}?"
    add(f"position_{i}", text, "Spatial", (f"exists_{i}", f"exists_{j}"), clause=f"include[{i}]",
        **{"class": clause["class"]}, relation=relation, relative_to=f"include[{j}]")


def _the(clause: Clause, include: list[Clause | None]) -> str:
    """"the dog" / "the dogs", adding the colour when the class alone is ambiguous."""
    noun = singular(clause["class"]) if clause["count"] == 1 else plural(clause["class"])
    if _ambiguous(clause, include) and isinstance(clause.get("color"), str):
        noun = f"{clause['color'].strip()} {noun}"
    return f"the {noun}"


def _ambiguous(clause: Clause, include: list[Clause | None]) -> bool:
    return sum(1 for c in include if c and c["class"] == clause["class"]) > 1


def _exclude_question(j: int, clause: Clause, include: list[Clause | None], add: AddQuestion) -> None:
    cls, n = clause["class"], clause["count"]
    meta = {"clause": f"exclude[{j}]", "class": cls, "count": n}
    if n == 1:
        add(f"exclude_{j}", f"Is the image free of any {singular(cls)}?", "Negative", (), **meta)
        return
    same = next((i for i, inc in enumerate(include) if inc and inc["class"] == cls), None)
    deps = (f"exists_{same}",) if same is not None else ()
    add(f"exclude_{j}", f"Are there fewer than {number(n)} {plural(cls)}?", "Negative", deps, **meta)
