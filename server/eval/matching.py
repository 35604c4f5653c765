"""Which image belongs to which prompt: the questions file, the naming conventions, the mapping file.

Images are matched to the `item_id`s of a questions JSONL (what `dvreward import` writes) by
one of these conventions, checked in this order:

- in a folder (searched recursively):
  - `<item_id>.<ext>`                 one image of the item;
  - `<item_id>_<k>.<ext>`             sample k (digits) of the item; an exact `<item_id>` wins;
  - `<item_id>/<k>.<ext>`             sample k (digits) in a per-item folder;
  - `<item_id>/samples/<k>.<ext>`     GenEval's layout (`<index>/samples/<k>.png`);
- or a JSONL mapping file with one `{"image": path, "item_id": id}` per line (relative paths
  are relative to the mapping file); `"source": path` adds the image it was edited from, shown
  before it (editing benchmarks).

Every image that matches no item, and every item with no image, is reported; nothing is
dropped silently. Non-image files (by extension) and hidden files are not images and are
skipped (GenEval's `metadata.jsonl` lives beside its samples).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from dvreward_protocol.questions import DecompositionError, Question
from server.eval.importers.base import PromptRecord

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
_SAMPLE = re.compile(r"\d+")
MAX_LISTED_PROBLEMS = 10


class EvalInputError(ValueError):
    """The inputs cannot be evaluated as given (unreadable or invalid file); the message says why."""


@dataclass(frozen=True)
class ImageJob:
    """One image to score against one item; (item_id, image) identifies it in results.jsonl."""

    item_id: str
    image: str  # relative to the images folder, or as written in the mapping file
    path: Path  # absolute
    sample: str | None = None
    source: Path | None = None  # editing: the image it was edited from (absolute), shown before it

    @property
    def key(self) -> tuple[str, str]:
        return (self.item_id, self.image)


@dataclass(frozen=True)
class Unmatched:
    image: str
    reason: str


@dataclass
class Matching:
    jobs: list[ImageJob] = field(default_factory=list)
    unmatched: list[Unmatched] = field(default_factory=list)
    items_without_images: list[str] = field(default_factory=list)


def questions_fingerprint(path: str | Path) -> str:
    """sha256 of the questions file: results are only resumable against the same questions."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as e:
        raise EvalInputError(f"{path}: cannot read: {e}") from e


def load_questions(path: str | Path) -> dict[str, PromptRecord]:
    """Items of a questions JSONL in file order; any invalid line is an error naming the line."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalInputError(f"{path}: cannot read: {e}") from e
    items: dict[str, PromptRecord] = {}
    problems: list[str] = []
    for n, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            item = _parse_item(raw)
        except (ValueError, ValidationError) as e:
            problems.append(f"{path}:{n}: {_short_error(e)}")
            continue
        if item.item_id in items:
            problems.append(f"{path}:{n}: duplicate item_id {item.item_id!r}")
            continue
        items[item.item_id] = item
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise EvalInputError("invalid questions file:\n  " + "\n  ".join(problems[:MAX_LISTED_PROBLEMS]) + more)
    if not items:
        raise EvalInputError(f"{path}: no items (expected one JSON object per line, as `dvreward import` writes)")
    return items


def _short_error(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        return f"invalid question{(' at ' + where) if where else ''}: {err['msg']}"
    return str(e)


def _parse_item(raw: str) -> PromptRecord:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg}") from e
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    item_id, prompt, questions = obj.get("item_id"), obj.get("prompt"), obj.get("questions")
    if isinstance(item_id, int) and not isinstance(item_id, bool):
        item_id = str(item_id)
    if not isinstance(item_id, str) or not item_id.strip():
        raise ValueError("no item_id")
    if not isinstance(prompt, str):
        raise ValueError(f"item {item_id!r}: no prompt")
    if not isinstance(questions, list) or not questions:
        raise ValueError(f"item {item_id!r}: no questions list")
    source = obj.get("source")
    try:
        qs = tuple(Question.model_validate(q) for q in questions)
        return PromptRecord(item_id.strip(), prompt, qs, source if isinstance(source, str) else "")
    except DecompositionError as e:
        raise ValueError(f"item {item_id!r}: {e}") from e


def match_images(images: str | Path, items: dict[str, PromptRecord]) -> Matching:
    """Jobs in questions-file order (samples numerically), plus everything that did not match."""
    src = Path(images)
    if src.is_dir():
        m = _match_folder(src, items)
    elif src.is_file():
        m = _match_mapping(src, items)
    else:
        raise EvalInputError(f"{src}: no such folder or mapping file")
    order = {item_id: i for i, item_id in enumerate(items)}
    m.jobs.sort(key=lambda j: (order[j.item_id], _sample_order(j.sample), j.image))
    having = {j.item_id for j in m.jobs}
    m.items_without_images = [item_id for item_id in items if item_id not in having]
    return m


def _sample_order(sample: str | None) -> tuple[int, int]:
    return (0, 0) if sample is None else (1, int(sample))


def _match_folder(root: Path, items: dict[str, PromptRecord]) -> Matching:
    m = Matching()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        item_id, sample, reason = _by_convention(rel, items)
        if item_id is None:
            m.unmatched.append(Unmatched(rel.as_posix(), reason))
        else:
            m.jobs.append(ImageJob(item_id, rel.as_posix(), path.resolve(), sample))
    return m


def _by_convention(rel: Path, items: dict[str, PromptRecord]) -> tuple[str | None, str | None, str]:
    """(item_id, sample, "") for a match, else (None, None, reason)."""
    parts, stem = rel.parts, rel.stem
    if len(parts) == 1:
        if stem in items:
            return stem, None, ""
        head, sep, k = stem.rpartition("_")
        if sep and _SAMPLE.fullmatch(k):
            if head in items:
                return head, k, ""
            return None, None, f"no item {stem!r} or {head!r} in the questions file"
        return None, None, f"no item {stem!r} in the questions file"
    folder = parts[0]
    layout_ok = (len(parts) == 2 or (len(parts) == 3 and parts[1] == "samples")) and _SAMPLE.fullmatch(stem)
    if not layout_ok:
        return None, None, ("not named by a convention (<item_id>/<k>.<ext> or <item_id>/samples/<k>.<ext>, "
                            "k digits)")
    if folder not in items:
        return None, None, f"folder {folder!r} names no item in the questions file"
    return folder, stem, ""


def _match_mapping(path: Path, items: dict[str, PromptRecord]) -> Matching:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalInputError(f"{path}: cannot read: {e}") from e
    m = Matching()
    seen: set[tuple[str, str]] = set()
    base = path.resolve().parent
    for n, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path.name}:{n}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            m.unmatched.append(Unmatched(where, f"invalid JSON: {e.msg}"))
            continue
        image = obj.get("image") if isinstance(obj, dict) else None
        if not isinstance(image, str) or not image.strip():
            m.unmatched.append(Unmatched(where, 'no "image" path'))
            continue
        item_id = obj.get("item_id")
        if isinstance(item_id, int) and not isinstance(item_id, bool):
            item_id = str(item_id)
        if not isinstance(item_id, str) or item_id not in items:
            m.unmatched.append(Unmatched(image, f"{where}: no item {item_id!r} in the questions file"))
            continue
        if (item_id, image) in seen:
            m.unmatched.append(Unmatched(image, f"{where}: duplicate of an earlier line for item {item_id!r}"))
            continue
        seen.add((item_id, image))
        sample = obj.get("sample")
        sample = str(sample) if isinstance(sample, int) and not isinstance(sample, bool) and sample >= 0 else None
        source = obj.get("source")
        if source is not None and not (isinstance(source, str) and source.strip()):
            m.unmatched.append(Unmatched(image, f'{where}: "source" must be an image path'))
            continue
        m.jobs.append(ImageJob(item_id, image, (base / image).resolve(), sample,
                               (base / source).resolve() if source else None))
    return m
