"""Importers: benchmark decompositions -> our question format, one record per prompt.

Each importer takes a path and returns `(records, issues)`: `PromptRecord`s whose questions
pass `validate_questions` (usable as the `questions` of a /v1/score group), and an
`ImportIssue` for every repair or skipped input, so nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from server.eval.importers.alphagrpo import import_alphagrpo
from server.eval.importers.base import (
    ImporterError,
    ImportIssue,
    IssueLog,
    PromptRecord,
    count_issues,
    write_jsonl,
)
from server.eval.importers.dsg import import_dsg_csv
from server.eval.importers.geneval import import_geneval
from server.eval.importers.tifa import import_tifa

Importer = Callable[[str | Path], tuple[list[PromptRecord], list[ImportIssue]]]

IMPORTERS: dict[str, Importer] = {
    "alphagrpo": import_alphagrpo,
    "dsg-csv": import_dsg_csv,
    "geneval": import_geneval,
    "tifa": import_tifa,
}

__all__ = [
    "IMPORTERS",
    "ImportIssue",
    "Importer",
    "ImporterError",
    "IssueLog",
    "PromptRecord",
    "count_issues",
    "import_alphagrpo",
    "import_dsg_csv",
    "import_geneval",
    "import_tifa",
    "write_jsonl",
]
