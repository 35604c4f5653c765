"""Shared pieces of the importers: the output record, the issue report, the atomic writer.

Importers never print and never drop anything silently: every repair or skipped input is
returned as an `ImportIssue`, so the CLI (or a test) decides how loud to be and whether a
repair is acceptable (`--strict`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dvreward_protocol.questions import Question, validate_questions
from server.eval.files import atomic_write

IssueKind = Literal["repair", "skip"]


class ImporterError(ValueError):
    """The file cannot be imported at all (unreadable, wrong format, missing columns)."""


@dataclass(frozen=True)
class ImportIssue:
    """One repair or skipped input, located precisely enough to fix it in the source file."""

    file: str
    line: int
    reason: str
    kind: IssueKind

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.kind}: {self.reason}"


@dataclass(frozen=True)
class PromptRecord:
    """One prompt and its questions, ready to be a /v1/score group."""

    item_id: str
    prompt: str
    questions: tuple[Question, ...]
    source: str

    def __post_init__(self) -> None:
        # An importer bug must fail here, not later inside the scoring service.
        validate_questions(list(self.questions))

    def to_json(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "prompt": self.prompt,
            "questions": [q.model_dump(mode="json") for q in self.questions],
            "source": self.source,
        }


@dataclass
class IssueLog:
    """Collects issues for one file so importers can report with a one-liner."""

    file: str
    issues: list[ImportIssue] = field(default_factory=list)

    def repair(self, line: int, reason: str) -> None:
        self.issues.append(ImportIssue(self.file, line, reason, "repair"))

    def skip(self, line: int, reason: str) -> None:
        self.issues.append(ImportIssue(self.file, line, reason, "skip"))

    def first_text(self, item_id: str, texts: list[tuple[int, str]], what: str) -> str | None:
        """An item's prompt from its rows' (line, text): the first non-empty one; rows that disagree are
        reported as repairs, and an item with none is reported (every row skipped)."""
        first = next((t for _, t in texts if t), None)
        for line, t in texts:
            if first is None:
                self.skip(line, f"item {item_id} has no {what}")
            elif t and t != first:
                self.repair(line, f"{what} differs from the first row of item {item_id}; kept the first")
        return first

    def in_file_order(self) -> list[ImportIssue]:
        """Issues by line (stable), since some are only found once a whole prompt is read."""
        return sorted(self.issues, key=lambda issue: issue.line)


def count_issues(issues: Iterable[ImportIssue]) -> dict[IssueKind, int]:
    counts: dict[IssueKind, int] = {"repair": 0, "skip": 0}
    for issue in issues:
        counts[issue.kind] += 1
    return counts


def write_jsonl(records: Iterable[PromptRecord], path: str | Path) -> None:
    """Write one JSON object per line via temp file + rename, so readers never see half a file."""
    body = "".join(json.dumps(record.to_json(), ensure_ascii=False) + "\n" for record in records)
    atomic_write(Path(path), body.encode("utf-8"))


def read_text(path: str | Path) -> str:
    """Read a UTF-8 file (BOM tolerated), turning OS and decoding errors into ImporterError."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ImporterError(f"{path}: cannot read: {e}") from e
