"""AlphaGRPO training data (JSONL, one sample a line) -> question records.

A line holds the prompt (`prompt`, or `caption`) and the reference's precomputed questions, either
at the top level or under `metadata` (see `dvreward_protocol.alphagrpo`); `id` / `item_id` names the item
(the line number otherwise). Defaulted tags are reported as repairs, unusable lines as skips.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dvreward_protocol.alphagrpo import has_reference_questions, reference_questions
from server.eval.importers.base import ImporterError, ImportIssue, IssueLog, PromptRecord, read_text


def import_alphagrpo(path: str | Path) -> tuple[list[PromptRecord], list[ImportIssue]]:
    log = IssueLog(str(path))
    records: list[PromptRecord] = []
    seen: set[str] = set()
    lines = read_text(path).splitlines()
    if not any(line.strip() for line in lines):
        raise ImporterError(f"{path}: the file is empty")
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            log.skip(line_no, f"not JSON: {e.msg}")
            continue
        record = _record(obj, line_no, log)
        if record is None:
            continue
        if record.item_id in seen:
            log.skip(line_no, f"duplicate item id {record.item_id!r}")
            continue
        seen.add(record.item_id)
        records.append(record)
    return records, log.in_file_order()


def _record(obj: Any, line: int, log: IssueLog) -> PromptRecord | None:
    if not isinstance(obj, dict):
        log.skip(line, "not a JSON object")
        return None
    meta = obj.get("metadata") if has_reference_questions(obj.get("metadata")) else obj
    prompt = next((obj[k] for k in ("prompt", "caption") if isinstance(obj.get(k), str) and obj[k].strip()), None)
    if prompt is None:
        log.skip(line, "no prompt")
        return None
    if meta is None or not has_reference_questions(meta):
        log.skip(line, "no semantic_questions or quality_questions")
        return None
    try:
        questions, notes = reference_questions(meta)
    except ValueError as e:
        log.skip(line, str(e))
        return None
    for note in notes:
        log.repair(line, note)
    item_id = str(obj.get("id", obj.get("item_id", line)))
    return PromptRecord(item_id, prompt.strip(), tuple(questions), "alphagrpo")
