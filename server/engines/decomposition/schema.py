"""JSON schemas (and one EBNF grammar) that constrain every decomposer generation.

Bounds on counts and string lengths make even a random model terminate; positional ids and
backward-only dependencies make duplicate ids, unknown parents and cycles impossible to write.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dvreward_protocol.questions import (
    QUALITY_ASPECTS,
    SEMANTIC_TAGS,
)

DSG_CATEGORIES: tuple[str, ...] = ("entity", "attribute", "relation", "global")


@dataclass(frozen=True)
class Limits:
    """Bounds written into every schema: they make any model, even a random one, terminate."""

    max_semantic: int  # the service's decomposer_max_semantic / _quality settings
    max_quality: int
    max_text_chars: int = 200
    max_parents: int = 4
    max_args: int = 3
    max_arg_chars: int = 48


def _text(limits: Limits) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": limits.max_text_chars}


def _obj(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def _positional(items: list[dict[str, Any]], min_items: int) -> dict[str, Any]:
    """An array whose i-th item follows the i-th schema: ids are fixed by position, never repeated."""
    return {"type": "array", "prefixItems": items, "items": False, "minItems": min_items,
            "maxItems": len(items)}


def _parents(earlier: Sequence[str], limits: Limits) -> dict[str, Any]:
    """Only earlier ids may be parents, so dependencies are known and acyclic by construction."""
    if not earlier:
        return {"type": "array", "maxItems": 0}
    return {"type": "array", "items": {"enum": list(earlier)}, "maxItems": min(len(earlier), limits.max_parents)}


def _quality_items(limits: Limits) -> dict[str, Any]:
    items = [_obj({"id": {"const": f"q{i}"}, "text": _text(limits), "aspect": {"enum": list(QUALITY_ASPECTS)}})
             for i in range(1, limits.max_quality + 1)]
    return _positional(items, 0)


def fast_schema(limits: Limits) -> dict[str, Any]:
    """The one-shot output: at least one semantic question, ids s1.. and q1.. by position."""
    ids = [f"s{i}" for i in range(1, limits.max_semantic + 1)]
    semantic = [_obj({"id": {"const": sid}, "text": _text(limits), "tag": {"enum": list(SEMANTIC_TAGS)},
                      "depends_on": _parents(ids[:n], limits)}) for n, sid in enumerate(ids)]
    return _obj({"semantic": _positional(semantic, 1), "quality": _quality_items(limits)})


def tuples_schema(limits: Limits) -> dict[str, Any]:
    """DSG stage 1: tuples t1.. with a category, a free type and 1..max_args arguments."""
    arg = {"type": "string", "minLength": 1, "maxLength": limits.max_arg_chars}
    items = [_obj({"id": {"const": f"t{i}"}, "category": {"enum": list(DSG_CATEGORIES)},
                   "type": {"type": "string", "minLength": 1, "maxLength": 24},
                   "args": {"type": "array", "items": arg, "minItems": 1, "maxItems": limits.max_args}})
             for i in range(1, limits.max_semantic + 1)]
    return _obj({"tuples": _positional(items, 1)})


def dependencies_schema(ids: Sequence[str], limits: Limits) -> dict[str, Any]:
    """DSG stage 2: exactly one item per tuple, in order, parents among earlier tuples only."""
    items = [_obj({"id": {"const": tid}, "parents": _parents(ids[:n], limits)}) for n, tid in enumerate(ids)]
    return _obj({"dependencies": _positional(items, len(items))})


def questions_schema(ids: Sequence[str], limits: Limits) -> dict[str, Any]:
    """DSG stage 3: exactly one question per tuple, in order."""
    items = [_obj({"id": {"const": tid}, "text": _text(limits)}) for tid in ids]
    return _obj({"questions": _positional(items, len(items))})


def quality_schema(limits: Limits) -> dict[str, Any]:
    """DSG stage 6: zero or more quality questions q1.. with an aspect each."""
    return _obj({"quality": _quality_items(limits)})


def reason_schema(limits: Limits) -> dict[str, Any]:
    """DSG stage 4, for a rejected question: one sentence saying why."""
    return _obj({"reason": _text(limits)})


def choice_grammar(options: Sequence[str]) -> str:
    """EBNF for "exactly one of these strings, nothing else" (DSG stage 5: one semantic tag name)."""
    return "root ::= " + " | ".join(json.dumps(o) for o in options)

