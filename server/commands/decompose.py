"""`dvreward decompose PROMPT...`: prompts -> questions with the transformers decomposer, as JSON lines."""

from __future__ import annotations

import argparse
import json
import sys

from server.settings import setting_choices, setting_default


def _decompose(args: argparse.Namespace) -> int:
    from server.engines.base import EngineError
    from server.engines.hf.decomposer import HFDecomposer
    from server.settings import decomposer_limits, default_models

    try:
        engine = HFDecomposer(
            args.decomposer or default_models(args.device)[1], args.pipeline, device=args.device,
            dtype=args.dtype, max_new_tokens=args.max_new_tokens, max_retries=args.max_retries, seed=args.seed,
            limits=decomposer_limits(),
        )
        results = engine.decompose(args.prompts)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for d in results:
        print(json.dumps(d.model_dump(mode="json"), ensure_ascii=False))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "decompose",
        help="decompose prompts into semantic and quality questions (one JSON object per line)",
        description="Runs the decomposer in-process. Without --decomposer the default hub model is used "
        "(it must be downloadable or cached); `dvreward dev tiny-models DIR` builds an offline one.",
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="text-to-image prompt(s)")
    p.add_argument("--decomposer", metavar="PATH", help="local model directory or hub id (default: by device)")
    p.add_argument("--pipeline", choices=setting_choices("pipeline"), default=setting_default("pipeline"),
                   help="fast: one constrained generation per prompt; dsg: the published multi-stage pipeline")
    p.add_argument("--device", default=setting_default("device"), help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", choices=setting_choices("dtype"), default=setting_default("dtype"))
    p.add_argument("--max-new-tokens", type=int, default=setting_default("decomposer_max_new_tokens"),
                   help="longest decomposer output (the service's default)")
    p.add_argument("--max-retries", type=int, default=2, help="extra sampled attempts for an invalid result")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_decompose)
