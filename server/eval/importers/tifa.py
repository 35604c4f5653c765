"""TIFA question-answer JSON (tifa_v1.0_question_answers.json) -> yes/no questions.

The file is a JSON list (JSON Lines is accepted too) of entries `{"id", "caption",
"question", "choices", "answer", "element", "element_type", ...}`, several per caption.
Our questions must be answered "yes" by a good image, so:

- a yes/no question whose answer is "yes" is kept as it is;
- a yes/no question whose answer is "no" is skipped and reported: no rewording can be
  guaranteed to flip its meaning;
- a multiple-choice question becomes `<question> Is the answer "<answer>"?`.

TIFA has no dependency structure, so the questions have none.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dvreward_protocol.questions import Question
from server.eval.importers.base import ImporterError, ImportIssue, IssueLog, PromptRecord, read_text

_ELEMENT_TAGS: dict[str, str] = {
    "object": "Existence", "animal/human": "Existence", "animal": "Existence", "human": "Existence",
    "food": "Existence",
    "activity": "Action",
    "attribute": "Attribute", "color": "Attribute", "material": "Attribute", "shape": "Attribute",
    "other": "Attribute",
    "counting": "Count",
    "spatial": "Spatial",
    "location": "Environment",
}
FALLBACK_TAG = "Attribute"
MC_TEMPLATE = '{question} Is the answer "{answer}"?'


@dataclass
class _Entry:
    line: int
    caption: str
    question: Question


def import_tifa(path: str | Path) -> tuple[list[PromptRecord], list[ImportIssue]]:
    """Import TIFA questions grouped by text id (the caption when there is no id), in file order."""
    log = IssueLog(str(path))
    groups: dict[str, list[_Entry]] = {}
    counters: dict[str, int] = {}
    for line, obj in _json_entries(read_text(path), str(path), log):
        key = _key(obj)
        if key is None:
            log.skip(line, "entry has neither an id nor a caption")
            continue
        counters[key] = counters.get(key, 0) + 1  # ids count every entry, so skips leave stable gaps
        question = _question(str(counters[key]), obj, line, log)
        if question is not None:
            caption = obj.get("caption")
            caption = caption.strip() if isinstance(caption, str) else ""
            groups.setdefault(key, []).append(_Entry(line, caption, question))
    source = f"tifa:{Path(path).name}"
    records = [rec for key, entries in groups.items() if (rec := _record(key, entries, source, log))]
    return records, log.in_file_order()


def _json_entries(text: str, name: str, log: IssueLog) -> Iterator[tuple[int, Any]]:
    """(line, entry) pairs from a JSON list, or from JSON Lines when the file is not a list."""
    if not text.lstrip().startswith("["):
        for i, raw in enumerate(text.split("\n"), start=1):
            if raw.strip():
                try:
                    yield i, json.loads(raw)
                except json.JSONDecodeError as e:
                    log.skip(i, f"invalid JSON: {e.msg}")
        return
    decoder = json.JSONDecoder()
    pos, line, counted = text.index("[") + 1, 1, 0
    try:
        while True:
            pos = _skip_space(text, pos)
            if text.startswith("]", pos):
                break
            line += text.count("\n", counted, pos)
            counted = pos
            obj, pos = decoder.raw_decode(text, pos)
            yield line, obj
            pos = _skip_space(text, pos)
            if text.startswith(",", pos):
                pos += 1
            elif not text.startswith("]", pos):
                raise json.JSONDecodeError("expected ',' or ']'", text, pos)
    except json.JSONDecodeError as e:
        raise ImporterError(f"{name}:{e.lineno}: invalid JSON: {e.msg}") from e
    if text[pos + 1:].strip():
        raise ImporterError(f"{name}: unexpected content after the JSON list")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _key(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    for field in ("id", "caption"):
        value = obj.get(field)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    return None


def _question(qid: str, obj: dict[str, Any], line: int, log: IssueLog) -> Question | None:
    """Our question for one TIFA entry, or None (reported) when it cannot be one."""
    text = obj.get("question")
    answer = obj.get("answer")
    if not isinstance(text, str) or not text.strip():
        log.skip(line, "no question text")
        return None
    if not isinstance(answer, str | int | float) or isinstance(answer, bool) or not str(answer).strip():
        log.skip(line, f"question {text.strip()!r} has no answer")
        return None
    answer = str(answer).strip()
    choices = obj.get("choices")
    if choices is not None and not isinstance(choices, list):
        log.repair(line, "choices is not a list; ignored")
        choices = None
    choices = [str(c).strip() for c in choices or []]
    question = _sentence(text)
    if answer.lower() in ("yes", "no") and {c.lower() for c in choices} <= {"yes", "no"}:
        if answer.lower() == "no":
            log.skip(line, f"yes/no question {question!r} has answer 'no'; yes must mean good, so skipped")
            return None
        phrased = question
    else:
        phrased = MC_TEMPLATE.format(question=question, answer=answer)
    element_type = obj.get("element_type", obj.get("answer_type"))
    tag = _ELEMENT_TAGS.get(str(element_type).strip().lower()) if element_type is not None else None
    if tag is None:
        tag = FALLBACK_TAG
        log.repair(line, f"unknown element_type {element_type!r}; tagged {FALLBACK_TAG}")
    metadata = {"tifa_question": text.strip(), "choices": choices, "answer": answer,
                "element": obj.get("element"), "element_type": element_type}
    try:
        return Question(id=qid, text=phrased, tag=tag, metadata=metadata)
    except ValidationError as e:
        log.skip(line, f"invalid question: {e.errors()[0]['msg']}")
        return None


def _sentence(text: str) -> str:
    """Capitalised and ending in '?', since TIFA questions are lower-case and sometimes lack it."""
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith("?") else text + "?"


def _record(key: str, entries: list[_Entry], source: str, log: IssueLog) -> PromptRecord | None:
    caption = log.first_text(key, [(e.line, e.caption) for e in entries], "caption")
    if caption is None:
        return None
    return PromptRecord(item_id=key, prompt=caption, questions=tuple(e.question for e in entries),
                        source=source)
