"""Questions in the AlphaGRPO training data's own format, read into ours.

The reference stores precomputed questions in each sample's metadata: `semantic_questions` and
`quality_questions`, each a list of strings or of objects with a `question` field and possibly a
tag. Untagged questions (or tags outside our lists) get a documented default, marked in the
question's metadata as `{"tag_source": "default"}`: the tag only steers tag weights and summaries,
never p, so a default is honest where a crash would not be.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dvreward_protocol.questions import TAGS_BY_KIND, Kind, Question, validate_questions

SEMANTIC_KEY = "semantic_questions"
QUALITY_KEY = "quality_questions"
DEFAULT_TAGS: dict[Kind, str] = {Kind.semantic: "Attribute", Kind.quality: "Aesthetics"}
_TAG_KEYS = ("tag", "aspect", "category")
_TEXT_KEYS = ("question", "text")


def has_reference_questions(meta: Mapping[str, Any] | None) -> bool:
    return meta is not None and any(isinstance(meta.get(k), list) and meta.get(k) for k in (SEMANTIC_KEY, QUALITY_KEY))


def reference_questions(meta: Mapping[str, Any]) -> tuple[list[Question], list[str]]:
    """The sample's questions (ids s1.., q1..) and a note for every defaulted tag or skipped entry."""
    questions: list[Question] = []
    notes: list[str] = []
    for key, kind, prefix in ((SEMANTIC_KEY, Kind.semantic, "s"), (QUALITY_KEY, Kind.quality, "q")):
        entries = meta.get(key) or []
        if not isinstance(entries, list):
            raise ValueError(f"{key} must be a list, got {type(entries).__name__}")
        for n, entry in enumerate(entries, 1):
            text, tag = _text_and_tag(entry)
            if not text:
                notes.append(f"{key}[{n - 1}]: no question text; skipped")
                continue
            known = {t.lower(): t for t in TAGS_BY_KIND[kind]}
            extra: dict[str, Any] = {}
            if tag is None or tag.lower() not in known:
                extra = {"tag_source": "default"}
                notes.append(f"{key}[{n - 1}]: " + (f"tag {tag!r} is not a {kind.value} tag" if tag else "no tag")
                             + f"; tagged {DEFAULT_TAGS[kind]}")
            questions.append(Question(id=f"{prefix}{n}", text=text, kind=kind,
                                      tag=known.get((tag or "").lower(), DEFAULT_TAGS[kind]), metadata=extra))
    if not questions:
        raise ValueError(f"no questions in {SEMANTIC_KEY} / {QUALITY_KEY}")
    return validate_questions(questions), notes


def _text_and_tag(entry: Any) -> tuple[str, str | None]:
    if isinstance(entry, str):
        return entry.strip(), None
    if isinstance(entry, Mapping):
        text = next((entry[k] for k in _TEXT_KEYS if isinstance(entry.get(k), str)), "")
        tag = next((entry[k] for k in _TAG_KEYS if isinstance(entry.get(k), str)), None)
        return text.strip(), tag
    return "", None
