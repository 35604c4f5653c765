"""DSG-format CSV (Davidsonian Scene Graph; DPG-Bench, DSG-1k and TIFA160 ship it).

One row per proposition: `item_id, text, keywords, proposition_id, dependency,
category_broad, category_detailed, tuple, question_natural_language`. `dependency` is `0`
(no parent) or comma-separated parent proposition ids of the same item.

Files in the wild are messy, so the policy is: every row with question text becomes a
question; ids are made unique within a prompt; dependencies that do not name another
question of the same prompt are dropped; cycles are broken one edge at a time; numeric parts
of malformed fields are kept. Each of these is reported as an issue, never done silently.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from dvreward_protocol.questions import Question, find_cycle
from server.eval.importers.base import ImporterError, ImportIssue, IssueLog, PromptRecord, read_text

REQUIRED_COLUMNS: tuple[str, ...] = (
    "item_id", "text", "proposition_id", "dependency", "question_natural_language",
)
METADATA_COLUMNS: tuple[str, ...] = ("category_broad", "category_detailed", "tuple", "keywords")

# DSG's fine-grained category decides first (an "entity - scale" row is really an attribute);
# the broad one is the fallback. Covers the DSG paper's taxonomy and DPG-Bench's variants.
_DETAILED_TAGS: dict[str, str] = {
    "count": "Count",
    "text": "Text", "text rendering": "Text",
    "spatial": "Spatial",
    "action": "Action", "non-spatial": "Action",
    "color": "Attribute", "colour": "Attribute", "material": "Attribute", "shape": "Attribute",
    "texture": "Attribute", "scale": "Attribute", "size": "Attribute", "type": "Attribute",
    "state": "Attribute",
    "style": "Style",
    "whole": "Existence", "part": "Existence",
}
_BROAD_TAGS: dict[str, str] = {
    "entity": "Existence",
    "attribute": "Attribute",
    "relation": "Spatial",
    "action": "Action",
    "global": "Style",
}
FALLBACK_TAG = "Attribute"


def dsg_tag(broad: str, detailed: str) -> str | None:
    """Our semantic tag for a DSG category pair, or None when neither part is known."""
    detailed, broad = detailed.strip().lower(), broad.strip().lower()
    return _DETAILED_TAGS.get(detailed) or _BROAD_TAGS.get(broad)


@dataclass
class _Row:
    """A row that has question text; `question` carries no dependencies yet."""

    line: int
    item_id: str
    prompt: str
    pid: str
    dependency: str
    question: Question
    short: bool = False


@dataclass(frozen=True)
class _Columns:
    index: dict[str, int]  # lower-cased header name -> position
    width: int


@dataclass
class _Item:
    rows: list[_Row] = field(default_factory=list)
    skipped_ids: set[str] = field(default_factory=set)


def import_dsg_csv(path: str | Path) -> tuple[list[PromptRecord], list[ImportIssue]]:
    """Import a DSG-format CSV: one record per item_id, in order of first appearance."""
    log = IssueLog(str(path))
    items: dict[str, _Item] = {}
    for line, cells, columns in _csv_rows(read_text(path), str(path)):
        _add_row(items, line, cells, columns, log)
    source = f"dsg-csv:{Path(path).name}"
    records = [rec for item_id, item in items.items() if (rec := _build_item(item_id, item, source, log))]
    return records, log.in_file_order()


def _csv_rows(text: str, name: str) -> Iterator[tuple[int, list[str], _Columns]]:
    """Yield (first physical line, cells, column index) for every non-blank data row."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header_cells = next(reader, None)
        while header_cells == []:
            header_cells = next(reader, None)
    except csv.Error as e:
        raise ImporterError(f"{name}: not a CSV file: {e}") from e
    if header_cells is None:
        raise ImporterError(f"{name}: empty file")
    header: dict[str, int] = {}
    for i, col in enumerate(header_cells):
        header.setdefault(col.strip().lower(), i)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ImporterError(f"{name}: not a DSG CSV: missing column(s) {', '.join(missing)}")
    columns = _Columns(header, len(header_cells))
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ImporterError(f"{name}:{reader.line_num}: unreadable CSV: {e}") from e
        if cells:
            yield reader.line_num - sum(c.count("\n") for c in cells), cells, columns


def _add_row(items: dict[str, _Item], line: int, cells: list[str], columns: _Columns, log: IssueLog) -> None:
    """Turn one CSV row into a question of its item, or report why it cannot be one."""
    width = columns.width
    if len(cells) > width and any(c.strip() for c in cells[width:]):
        log.skip(line, f"row has {len(cells)} fields but the header has {width}; columns are misaligned")
        return

    def cell(col: str) -> str:
        i = columns.index.get(col)
        return cells[i].strip() if i is not None and i < len(cells) else ""

    if not any(c.strip() for c in cells):
        log.skip(line, "empty row")
        return
    item_id, text = cell("item_id"), cell("question_natural_language")
    if not item_id:
        log.skip(line, "no item_id")
        return
    item = items.setdefault(item_id, _Item())
    pid, note = _normalize_id(cell("proposition_id"), line)
    if not text:
        item.skipped_ids.add(pid)
        log.skip(line, f"no question text (item {item_id}, proposition {pid})")
        return
    if note:
        log.repair(line, note)
    question = _question(pid, text, cell, line, log)
    if question is not None:
        row = _Row(line, item_id, cell("text"), pid, cell("dependency"), question, short=len(cells) < width)
        item.rows.append(row)
    else:
        item.skipped_ids.add(pid)


def _normalize_id(raw: str, line: int) -> tuple[str, str | None]:
    """Canonical proposition id plus a note when that changed what the file says."""
    if re.fullmatch(r"\d+", raw):
        norm = str(int(raw))
        return norm, None if norm == raw else f"proposition_id {raw!r} read as {norm}"
    if re.fullmatch(r"\d+\.0*", raw):  # pandas writes integer columns with gaps as floats
        norm = str(int(float(raw)))
        return norm, f"proposition_id {raw!r} read as {norm}"
    if not raw:
        return f"L{line}", f"no proposition_id; using L{line}"
    return raw, None


def _question(pid: str, text: str, cell: Callable[[str], str], line: int, log: IssueLog) -> Question | None:
    """The row's question without dependencies (those need the whole item), or None if invalid."""
    broad, detailed = cell("category_broad"), cell("category_detailed")
    tag = dsg_tag(broad, detailed)
    if tag is None:
        tag = FALLBACK_TAG
        log.repair(line, f"unknown DSG category {broad!r}/{detailed!r}; tagged {FALLBACK_TAG}")
    metadata = {"proposition_id": pid, **{col: cell(col) for col in METADATA_COLUMNS}}
    try:
        return Question(id=pid, text=text, tag=tag, metadata=metadata)
    except ValidationError as e:
        log.skip(line, f"invalid question: {e.errors()[0]['msg']}")
        return None


def _build_item(item_id: str, item: _Item, source: str, log: IssueLog) -> PromptRecord | None:
    """Assemble one prompt: unique ids, resolved dependencies, no cycles."""
    if not item.rows:
        return None  # every row was already reported as skipped
    prompt = log.first_text(item_id, [(r.line, r.prompt) for r in item.rows], "prompt text")
    if prompt is None:
        return None
    final_ids = _unique_ids(item_id, item.rows, log)
    holder: dict[str, str] = {}  # original proposition id -> final id of its first question
    for row, fid in zip(item.rows, final_ids, strict=True):
        holder.setdefault(row.pid, fid)
    graph = {
        fid: _resolve_deps(row, fid, holder, item.skipped_ids, log)
        for row, fid in zip(item.rows, final_ids, strict=True)
    }
    _break_cycles(graph, {fid: row.line for row, fid in zip(item.rows, final_ids, strict=True)}, log)
    questions = []
    for row, fid in zip(item.rows, final_ids, strict=True):
        if row.short:
            log.repair(row.line, "row has fewer fields than the header; missing ones read as empty")
        questions.append(Question.model_validate({**row.question.model_dump(), "id": fid, "depends_on": graph[fid]}))
    return PromptRecord(item_id=item_id, prompt=prompt, questions=tuple(questions), source=source)


def _unique_ids(item_id: str, rows: list[_Row], log: IssueLog) -> list[str]:
    """Keep each first id; later repeats get `_2`, `_3`, ... (references mean the first)."""
    taken = {r.pid for r in rows}
    seen: dict[str, int] = {}
    out: list[str] = []
    for r in rows:
        if r.pid not in seen:
            seen[r.pid] = r.line
            out.append(r.pid)
            continue
        n = 2
        while (new := _suffixed(r.pid, n)) in taken:
            n += 1
        taken.add(new)
        out.append(new)
        log.repair(
            r.line,
            f"duplicate proposition_id {r.pid} in item {item_id} (first on line {seen[r.pid]}); "
            f"renamed to {new}, references to {r.pid} mean the first",
        )
    return out


def _suffixed(pid: str, n: int) -> str:
    suffix = f"_{n}"
    return pid[: 64 - len(suffix)] + suffix  # Question ids are at most 64 characters


def _parse_dependency(raw: str, known: set[str]) -> tuple[list[str], bool]:
    """Parent ids named by a dependency field, and whether the field was malformed.

    `0` means "no parent". A malformed token keeps its numeric parts (`5, right` -> 5); a
    non-numeric token is kept only when it names a proposition of the item verbatim.
    """
    ids: list[str] = []
    malformed = False
    tokens = [t.strip() for t in raw.split(",")]
    for token in tokens:
        if not token:
            continue
        if token in known and not token.isdigit():
            ids.append(token)
            continue
        if re.fullmatch(r"\d+", token):
            nums = [token]
        else:
            malformed = True
            nums = [token.split(".")[0]] if re.fullmatch(r"\d+\.0*", token) else re.findall(r"\d+", token)
        for num in nums:
            if int(num):
                ids.append(str(int(num)))
            elif len(tokens) > 1 or len(nums) > 1:
                malformed = True  # "0" (no parent) mixed with parents
    return ids, malformed


def _resolve_deps(
    row: _Row, fid: str, holder: dict[str, str], skipped: set[str], log: IssueLog,
) -> tuple[str, ...]:
    """Map the row's dependency field onto final ids, dropping (and reporting) what cannot be kept."""
    parents, malformed = _parse_dependency(row.dependency, set(holder) | skipped)
    if malformed:
        log.repair(row.line, f"malformed dependency {row.dependency!r}; kept {', '.join(parents) or 'none'}")
    out: list[str] = []
    for pid in parents:
        target = holder.get(pid)
        if target == fid:
            log.repair(row.line, f"proposition {fid} depends on itself; dependency dropped")
        elif target is not None and target in out:
            log.repair(row.line, f"dependency on {pid} listed twice; kept once")
        elif target is not None:
            out.append(target)
        elif pid in skipped:
            log.repair(row.line, f"dependency on {pid} dropped: that row has no usable question")
        else:
            log.repair(row.line, f"dependency on {pid} dropped: no proposition {pid} in item {row.item_id}")
    return tuple(out)


def _break_cycles(graph: dict[str, tuple[str, ...]], lines: dict[str, int], log: IssueLog) -> None:
    """Drop one edge per cycle until none is left.

    The dropped edge is the one pointing at the cycle member that comes last in the file: DSG
    lists parents before children, so that edge is the likeliest to be the mistake.
    """
    order = {qid: i for i, qid in enumerate(graph)}
    while cycle := find_cycle(graph):
        edges = list(zip(cycle, cycle[1:], strict=False))  # (child, parent) pairs
        child, parent = max(edges, key=lambda e: order[e[1]])
        graph[child] = tuple(p for p in graph[child] if p != parent)
        log.repair(
            lines[child],
            f"dependency cycle {' -> '.join(cycle)}; dropped {child}'s dependency on {parent}",
        )
