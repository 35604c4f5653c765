"""`dvreward import FORMAT FILE -o OUT`: benchmark decompositions -> question JSONL."""

from __future__ import annotations

import argparse
import sys

from server.eval.importers import IMPORTERS, ImporterError, count_issues, write_jsonl


def _import(args: argparse.Namespace) -> int:
    try:
        records, issues = IMPORTERS[args.format](args.file)
    except ImporterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for issue in issues:
        print(issue, file=sys.stderr)
    counts = count_issues(issues)
    n_questions = sum(len(r.questions) for r in records)
    summary = (f"imported {len(records)} prompts, {n_questions} questions; "
               f"{counts['skip']} skipped, {counts['repair']} repaired")
    if args.strict and issues:
        print(f"{summary}; --strict: {len(issues)} issue(s), nothing written", file=sys.stderr)
        return 1
    try:
        write_jsonl(records, args.output)
    except OSError as e:
        print(f"error: cannot write {args.output}: {e}", file=sys.stderr)
        return 2
    print(summary, file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="turn a benchmark decomposition (DSG CSV, GenEval metadata, TIFA JSON) into question JSONL",
        description="Every repair and skipped input is reported on stderr as FILE:LINE: kind: reason.",
    )
    p.add_argument("format", choices=sorted(IMPORTERS), help="input format")
    p.add_argument("file", help="input file")
    p.add_argument("-o", "--output", required=True, help="output JSONL, one prompt per line (written atomically)")
    p.add_argument("--strict", action="store_true", help="fail (exit 1, write nothing) on any repair or skip")
    p.set_defaults(func=_import)
