"""The question model: atomic yes/no questions a prompt decomposes into.

Validation lives here so every entry point (decomposer output, API input, importers)
rejects the same malformed decompositions with the same messages.
"""

from __future__ import annotations

import math
import unicodedata
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator


class Kind(StrEnum):
    semantic = "semantic"
    quality = "quality"


SEMANTIC_TAGS: tuple[str, ...] = (
    "Style", "Environment", "Viewpoint", "Existence", "Count",
    "Attribute", "Action", "Spatial", "Text", "Negative",
)
QUALITY_ASPECTS: tuple[str, ...] = (
    "Geometry", "Anatomy", "Texture", "Coherence", "Lighting", "Physics", "Legibility", "Aesthetics",
)
TAGS_BY_KIND: dict[Kind, tuple[str, ...]] = {Kind.semantic: SEMANTIC_TAGS, Kind.quality: QUALITY_ASPECTS}


MAX_METADATA_DEPTH = 32


def valid_text(v: str) -> str:
    """Refuse strings that are not Unicode text: JSON escapes can carry unpaired UTF-16 surrogates (\\ud800),
    which no tokenizer, hash or UTF-8 response can take."""
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = v[exc.start]
            raise ValueError(f"not valid Unicode: unpaired surrogate {bad!r} at character {exc.start}") from None
    return v


def blank(text: str) -> bool:
    """No visible character: whitespace, controls and invisible format characters only (zero-width spaces and
    joiners, byte order marks, direction marks), which `str.strip()` keeps. Such a question asks nothing."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp") for ch in text)


def valid_metadata(v: dict[str, Any]) -> dict[str, Any]:
    """Metadata is echoed back, so it must be plain JSON: valid Unicode, finite numbers, bounded nesting."""
    stack: list[tuple[Any, str, int]] = [(v, "", 1)]
    while stack:  # iterative: depth is what is being checked
        node, path, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_METADATA_DEPTH:
                raise ValueError(f"nested more than {MAX_METADATA_DEPTH} levels deep (at {path or 'the top'})")
            pairs = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in pairs:
                if isinstance(key, str):
                    _valid_at(key, f"{path}[{key!r}]")
                stack.append((child, f"{path}[{key!r}]", depth + 1))
        elif isinstance(node, str):
            _valid_at(node, path)
        elif isinstance(node, float) and not math.isfinite(node):
            raise ValueError(f"{path}: {node} is not a JSON number")
    return v


def _valid_at(text: str, path: str) -> None:
    try:
        valid_text(text)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


Text = Annotated[str, AfterValidator(valid_text)]
Metadata = Annotated[dict[str, Any], AfterValidator(valid_metadata)]


class Question(BaseModel):
    """One atomic yes/no question; "yes" always means the image is good."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=64)
    text: str = Field(min_length=1, max_length=1000)
    kind: Kind = Kind.semantic
    tag: str
    depends_on: tuple[str, ...] = ()
    metadata: Metadata = Field(default_factory=dict)

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, v: str) -> str:
        if blank(v):
            raise ValueError("question text is empty (nothing but whitespace or invisible characters)")
        return v.strip()

    @model_validator(mode="after")
    def _tag_matches_kind(self) -> Question:
        allowed = TAGS_BY_KIND[self.kind]
        if self.tag not in allowed:
            raise ValueError(
                f"question {self.id!r}: tag {self.tag!r} is not a {self.kind.value} tag; "
                f"expected one of {', '.join(allowed)}"
            )
        if self.kind is Kind.quality and self.depends_on:
            raise ValueError(f"question {self.id!r}: quality questions cannot have dependencies")
        return self


class DecompositionError(ValueError):
    """A question list that cannot be scored as a whole (duplicates, bad references, cycles)."""


def validate_questions(questions: list[Question]) -> list[Question]:
    """Check the cross-question invariants a single Question cannot check alone."""
    if not questions:
        raise DecompositionError("a decomposition needs at least one question")
    ids = [q.id for q in questions]
    seen: set[str] = set()
    for qid in ids:
        if qid in seen:
            raise DecompositionError(f"duplicate question id {qid!r}")
        seen.add(qid)
    for q in questions:
        for parent in q.depends_on:
            if parent == q.id:
                raise DecompositionError(f"question {q.id!r} depends on itself")
            if parent not in seen:
                raise DecompositionError(f"question {q.id!r} depends on unknown id {parent!r}")
    cycle = find_cycle({q.id: q.depends_on for q in questions})
    if cycle:
        raise DecompositionError("dependency cycle: " + " -> ".join(cycle))
    return questions


def find_cycle(graph: dict[str, tuple[str, ...]]) -> list[str] | None:
    """Return one cycle as a closed path of ids, or None; iterative so deep chains cannot overflow."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for root in graph:
        if state.get(root):
            continue
        path: list[str] = [root]
        iters = [iter(graph.get(root, ()))]
        state[root] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
                continue
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(graph.get(nxt, ())))
    return None


def topological_order(questions: list[Question]) -> list[Question]:
    """Parents before children, keeping the given order otherwise (needed for gating)."""
    by_id = {q.id: q for q in questions}
    done: set[str] = set()
    out: list[Question] = []

    def visit(q: Question) -> None:
        stack = [(q, iter(q.depends_on))]
        while stack:
            node, it = stack[-1]
            parent = next(it, None)
            if parent is None:
                stack.pop()
                if node.id not in done:
                    done.add(node.id)
                    out.append(node)
            elif parent not in done and parent in by_id:
                stack.append((by_id[parent], iter(by_id[parent].depends_on)))

    for q in questions:
        if q.id not in done:
            visit(q)
    return out


class Decomposition(BaseModel):
    """A prompt and the questions that decide whether an image matches it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    questions: tuple[Question, ...]
    pipeline: str = "explicit"
    model: str | None = None
    template_version: str | None = None
    warnings: tuple[str, ...] = Field((), description="what the decomposer reported, e.g. a list cut at its cap")

    @model_validator(mode="after")
    def _valid(self) -> Decomposition:
        validate_questions(list(self.questions))
        return self

    @property
    def semantic(self) -> list[Question]:
        return [q for q in self.questions if q.kind is Kind.semantic]

    @property
    def quality(self) -> list[Question]:
        return [q for q in self.questions if q.kind is Kind.quality]
