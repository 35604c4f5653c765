"""`dvreward eval`: score matched images, append results.jsonl per batch, resume, summarise, report.

results.jsonl is the run's state. Each batch is appended and fsynced, so a run killed at any
point loses at most the batch in flight; on start the existing lines are read back (a
truncated last line is reported and cut off) and every image already there is skipped.
run.json pins what the results depend on (the questions file, gating, aggregation): resuming
into an OUTDIR made with other settings is refused rather than mixing results.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dvreward_protocol.reward import Aggregation, Gating
from server.eval.files import atomic_write
from server.eval.importers.base import PromptRecord
from server.eval.matching import EvalInputError, ImageJob, Matching, load_questions, match_images
from server.eval.matching import questions_fingerprint as fingerprint
from server.eval.report import write_html, write_png
from server.eval.scoring import Backend, HTTPBackend, LocalBackend, ScoreInput, ServiceUnavailableError
from server.eval.summary import build_record, summarize

RESULTS, SUMMARY, REPORT, CHART, RUN = "results.jsonl", "summary.json", "report.html", "summary.png", "run.json"
MAX_LISTED = 20


@dataclass
class EvalOptions:
    images: Path
    questions: Path
    out: Path
    server: str | None = None
    api_key: str | None = None
    verifier: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    verifier_options: dict[str, Any] = field(default_factory=dict)  # system prompt, pixel range (HFVerifier.load)
    gating: Gating = Gating.none
    aggregation: Aggregation = Aggregation.geometric
    batch_size: int = 8
    timeout_s: float = 300.0
    max_retries: int = 8
    max_questions: int = 64
    retry_errors: bool = False
    progress: bool = True
    report_max_images: int = 1000


@dataclass
class EvalResult:
    summary: dict[str, Any]
    exit_code: int
    out: Path
    messages: list[str] = field(default_factory=list)


@dataclass
class _Existing:
    records: dict[tuple[str, str], dict[str, Any]]


def make_backend(opts: EvalOptions) -> Backend:
    if opts.server:
        return HTTPBackend(opts.server, opts.api_key, timeout_s=opts.timeout_s, max_retries=opts.max_retries,
                           max_questions=opts.max_questions)
    if not opts.verifier:
        raise EvalInputError("give --server URL or --verifier PATH")
    from server.engines.hf.verifier import HFVerifier

    return LocalBackend(HFVerifier.load(opts.verifier, device=opts.device, dtype=opts.dtype, **opts.verifier_options))


def run_eval(
    opts: EvalOptions,
    backend: Backend | None = None,
    *,
    err: TextIO | None = None,
    backend_factory: Callable[[EvalOptions], Backend] = make_backend,
) -> EvalResult:
    """Evaluate; `backend` (or the factory, called only when there is work) does the scoring."""
    err = err or sys.stderr

    def say(msg: str) -> None:
        print(msg, file=err, flush=True)

    if opts.batch_size < 1:
        raise EvalInputError("--batch-size must be at least 1")
    items = load_questions(opts.questions)
    matching = match_images(opts.images, items)
    _report_mismatches(matching, say)
    if not matching.jobs:
        raise EvalInputError(f"no image in {opts.images} matches an item of {opts.questions}")
    opts.out.mkdir(parents=True, exist_ok=True)
    _pin_run(opts)
    results_path = opts.out / RESULTS
    existing = _read_results(results_path, items, say)
    if opts.retry_errors:
        _drop_errors(results_path, existing, say)
    job_keys = {j.key for j in matching.jobs}
    stale = sum(1 for k in existing.records if k not in job_keys)
    if stale:
        say(f"note: {stale} result(s) in {results_path} are for images not in this run's input; "
            "kept in the file, left out of the summary")
    todo = [j for j in matching.jobs if j.key not in existing.records]
    resumed = len(matching.jobs) - len(todo)
    if resumed:
        say(f"resuming: {resumed} of {len(matching.jobs)} image(s) already in {results_path}; "
            f"scoring the remaining {len(todo)}")
    exit_code = 0
    new: dict[tuple[str, str], dict[str, Any]] = {}
    if todo:
        try:
            _score(opts, todo, items, backend, backend_factory, results_path, new)
        except ServiceUnavailableError as e:
            say(f"error: {e}\nstopped; the {len(new)} image(s) scored so far are saved; "
                "rerun the same command to resume")
            exit_code = 1
        except KeyboardInterrupt:
            say(f"interrupted; the {len(new)} image(s) scored so far are saved; rerun the same command to resume")
            exit_code = 130
    done = {**existing.records, **new}
    records = [done[j.key] for j in matching.jobs if j.key in done]
    summary = summarize(records, items, matching, gating=opts.gating, aggregation=opts.aggregation,
                        resumed=resumed, scored_this_run=len(new), stale=stale,
                        complete=len(records) == len(matching.jobs))
    if len(summary["models"]) > 1:
        say(f"warning: results come from several models: {', '.join(summary['models'])}")
    atomic_write(opts.out / SUMMARY, (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    write_html(opts.out / REPORT, summary, records, opts.report_max_images)
    write_png(opts.out / CHART, summary)
    c, o = summary["counts"], summary["overall"]
    lead = o["lead"]
    mean = "n/a" if o[lead] is None else f"{o[lead]:.4f}"
    say(f"{c['scored']} image(s) scored, {c['errors']} failed, {c['pending']} pending; "
        f"mean {'reward' if lead == 'reward' else lead.upper()} {mean}; "
        f"wrote {opts.out / RESULTS}, {SUMMARY}, {REPORT}, {CHART}")
    for note in summary["notes"]:
        say(f"note: {note}")
    return EvalResult(summary, exit_code, opts.out)


def _report_mismatches(m: Matching, say: Callable[[str], None]) -> None:
    if m.unmatched:
        say(f"warning: {len(m.unmatched)} image(s) match no item and are not scored:")
        for u in m.unmatched[:MAX_LISTED]:
            say(f"  {u.image}: {u.reason}")
        if len(m.unmatched) > MAX_LISTED:
            say(f"  ... and {len(m.unmatched) - MAX_LISTED} more (all listed in summary.json)")
    if m.items_without_images:
        say(f"warning: {len(m.items_without_images)} item(s) have no image: "
            + ", ".join(m.items_without_images[:MAX_LISTED])
            + (" ..." if len(m.items_without_images) > MAX_LISTED else ""))


def _pin_run(opts: EvalOptions) -> None:
    """Write run.json, or check that an existing one was made with the same questions and settings."""
    pinned = {
        "questions_sha256": fingerprint(opts.questions),
        "gating": Gating(opts.gating).value,
        "aggregation": Aggregation(opts.aggregation).value,
    }
    path = opts.out / RUN
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EvalInputError(f"{path}: unreadable ({e}); remove it or use another -o") from e
        changed = [k for k, v in pinned.items() if old.get(k) != v]
        if changed:
            what = ", ".join(f"{k}: {old.get(k)!r} -> {pinned[k]!r}" for k in changed)
            raise EvalInputError(f"{opts.out} holds results of a run with other settings ({what}); "
                                 "use a new -o, or remove the old results to start over")
        return
    meta = {**pinned, "questions": str(Path(opts.questions).resolve()), "images": str(Path(opts.images).resolve()),
            "backend": opts.server or opts.verifier}
    atomic_write(path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))


def _read_results(path: Path, items: dict[str, PromptRecord], say: Callable[[str], None]) -> _Existing:
    """Existing records by (item_id, image); a truncated last line is reported and cut off the file."""
    if not path.exists():
        return _Existing({})
    data = path.read_bytes()
    records: dict[tuple[str, str], dict[str, Any]] = {}
    end = data.rfind(b"\n") + 1
    if end < len(data):
        say(f"warning: {path}: the last line is truncated (a run was interrupted while writing); "
            f"dropped {len(data) - end} byte(s), that image is scored again")
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    lines = data[:end].split(b"\n")[:-1]
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError as e:
            raise EvalInputError(f"{path}:{n}: not a JSON line ({e}); fix or remove it, or use another -o") from e
        problem = _check_record(rec, items)
        if problem:
            raise EvalInputError(f"{path}:{n}: {problem}; fix or remove it, or use another -o")
        key = (rec["item_id"], rec["image"])
        if key in records:
            say(f"warning: {path}:{n}: image {key[1]} of item {key[0]} appears twice; keeping the first")
            continue
        records[key] = rec
    return _Existing(records)


def _check_record(rec: Any, items: dict[str, PromptRecord]) -> str | None:
    if not isinstance(rec, dict) or not isinstance(rec.get("item_id"), str) or not isinstance(rec.get("image"), str):
        return "not a result record (no item_id / image)"
    item = items.get(rec["item_id"])
    if item is None:
        return None  # an item no longer in the questions file cannot happen with the same fingerprint
    qs = rec.get("questions")
    if not isinstance(qs, list) or [q.get("id") if isinstance(q, dict) else None for q in qs] != [
        q.id for q in item.questions
    ]:
        return f"questions of item {rec['item_id']!r} differ from the questions file"
    return None


def _drop_errors(path: Path, existing: _Existing, say: Callable[[str], None]) -> None:
    failed = [k for k, r in existing.records.items() if r.get("error") is not None or r.get("reward") is None]
    if not failed:
        return
    for k in failed:
        del existing.records[k]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in existing.records.values())
    atomic_write(path, body.encode("utf-8"))
    say(f"--retry-errors: {len(failed)} failed image(s) removed from {path} and scored again")


def _score(
    opts: EvalOptions, todo: Sequence[ImageJob], items: dict[str, PromptRecord], backend: Backend | None,
    factory: Callable[[EvalOptions], Backend], results_path: Path, new: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """Score `todo` batch by batch; each batch is appended to results.jsonl and fsynced before the next."""
    from tqdm import tqdm

    own = backend is None
    backend = backend or factory(opts)
    try:
        with open(results_path, "a", encoding="utf-8") as f, tqdm(
            total=len(todo), unit="img", desc="scoring", file=sys.stderr, disable=not opts.progress,
            dynamic_ncols=True,
        ) as bar:
            for start in range(0, len(todo), opts.batch_size):
                batch = todo[start:start + opts.batch_size]
                outcomes = backend.score([
                    ScoreInput(j.path, tuple(q.text for q in items[j.item_id].questions), j.source) for j in batch
                ])
                model = backend.model_id
                recs = [build_record(job, items[job.item_id], outcome.p, outcome.error, opts.gating,
                                     opts.aggregation, model) for job, outcome in zip(batch, outcomes, strict=True)]
                f.write("".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in recs))
                f.flush()
                os.fsync(f.fileno())
                new.update((job.key, rec) for job, rec in zip(batch, recs, strict=True))
                failed = sum(1 for o in outcomes if o.error is not None)
                if failed:
                    bar.write(f"{failed} image(s) failed in this batch (see results.jsonl)", file=sys.stderr)
                bar.update(len(batch))
    finally:
        if own:
            backend.close()
