"""`dvreward eval`: score a folder (or JSONL list) of generated images against benchmark questions.

Usage:

    dvreward import dsg-csv dpg_bench.csv -o questions.jsonl      # or geneval / tifa
    dvreward eval --images out/ --questions questions.jsonl --verifier Qwen/Qwen2.5-VL-7B-Instruct \\
        --device cuda:0 --dtype bfloat16 -o eval/ --gating hard
    dvreward eval --images out/ --questions questions.jsonl --server http://host:8000 -o eval/
        # API key from --api-key or DVREWARD_API_KEY

Images are matched to the questions' item_ids by name: `<item_id>.<ext>`, `<item_id>_<k>.<ext>`,
`<item_id>/<k>.<ext>` or GenEval's `<item_id>/samples/<k>.<ext>`; or give a JSONL file of
`{"image": path, "item_id": id}` lines as --images. Images matching no item and items without
images are reported on stderr and in summary.json.

OUTDIR gets results.jsonl (one line per image: per-question p and gated p, reward, SC, PQ, or
an error with a null reward), summary.json (means by semantic tag, quality aspect and the
benchmark's own categories; counts), report.html (self-contained) and summary.png.
Interrupted runs resume: rerun the same command and only the missing images are scored
(--retry-errors also re-scores failed ones). Exit codes: 0 done, 1 stopped because the
service was unusable (resumable), 2 bad input, 130 interrupted (resumable).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dvreward_protocol.reward import Aggregation, Gating
from server.commands.verifier_flags import add_verifier_flags, verifier_options
from server.settings import setting_choices, setting_default


def _eval(args: argparse.Namespace) -> int:
    from server.engines.base import EngineError
    from server.eval.matching import EvalInputError
    from server.eval.run import EvalOptions, run_eval
    from trainer_client.errors import ConfigurationError

    try:
        engine_options = verifier_options(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opts = EvalOptions(
        images=Path(args.images), questions=Path(args.questions), out=Path(args.output),
        server=args.server, api_key=args.api_key or os.environ.get("DVREWARD_API_KEY") or None,
        verifier=args.verifier, device=args.device, dtype=args.dtype, verifier_options=engine_options,
        gating=Gating(args.gating), aggregation=Aggregation(args.aggregation), batch_size=args.batch_size,
        timeout_s=args.timeout, max_retries=args.max_retries, max_questions=args.max_questions,
        retry_errors=args.retry_errors, progress=not args.no_progress, report_max_images=args.report_max_images,
    )
    try:
        return run_eval(opts).exit_code
    except (EvalInputError, EngineError, ConfigurationError) as e:  # --server localhost:8000: no scheme
        print(f"error: {e}", file=sys.stderr)
        return 2


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score generated images against benchmark questions; results, summary and an HTML report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", required=True, help="folder of images named by item_id, or a JSONL mapping file")
    p.add_argument("--questions", required=True, help="questions JSONL (as written by `dvreward import`)")
    p.add_argument("-o", "--output", required=True, help="output folder (reused to resume)")
    backend = p.add_mutually_exclusive_group(required=True)
    backend.add_argument("--server", help="score through a running service at this URL (POST /v1/verify)")
    backend.add_argument("--verifier", help="score in this process with this verifier (local dir or hub id)")
    p.add_argument("--api-key", default=None, help="Bearer key for --server (default: env DVREWARD_API_KEY)")
    p.add_argument("--device", default=setting_default("device"),
                   help="torch device for --verifier (default %(default)s)")
    p.add_argument("--dtype", default=setting_default("dtype"), choices=setting_choices("dtype"),
                   help="dtype for --verifier (default %(default)s)")
    add_verifier_flags(p)
    p.add_argument("--gating", default=Gating.none.value, choices=[g.value for g in Gating],
                   help="dependency gating of the reward and of the tag/aspect means (benchmark categories "
                        "always use hard gating)")
    p.add_argument("--aggregation", default=Aggregation.geometric.value, choices=[a.value for a in Aggregation],
                   help="how SC and PQ become the reward (default geometric)")
    p.add_argument("--batch-size", type=_positive, default=8, help="images per verifier call / request")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one --server response")
    p.add_argument("--max-retries", type=int, default=8, help="retries of a request answered 429/503 or lost")
    p.add_argument("--max-questions", type=_positive, default=64,
                   help="questions per item sent to --server (longer lists are split; the service's limit)")
    p.add_argument("--retry-errors", action="store_true", help="when resuming, score failed images again")
    p.add_argument("--report-max-images", type=int, default=1000, help="images shown in report.html (all are "
                   "in results.jsonl)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval)
