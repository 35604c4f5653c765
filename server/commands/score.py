"""`dvreward score`: score images offline, in-process, and print JSON (no server, no queue)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from dvreward_protocol.pixels import to_rgb
from dvreward_protocol.questions import Decomposition, DecompositionError, Question, validate_questions
from dvreward_protocol.reward import Aggregation, Gating, score_image
from server.commands.verifier_flags import add_verifier_flags, verifier_options
from server.errors import validation_problems
from server.settings import setting_choices, setting_default

QUESTION_SHAPE = '{"id": "1", "text": "Is there a cat?", "tag": "Existence"}'


def read_questions(path: Path) -> tuple[str | None, list[Question]]:
    """(prompt, questions) from a JSON list of questions, or one JSON object / one JSONL record with a
    `questions` list (and optionally its `prompt`). Several records are refused: the images on the
    command line belong to one prompt."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{path}: the file is empty") from None
        if len(lines) > 1:
            raise ValueError(f"{path} holds {len(lines)} records; `dvreward score` scores the images given for one "
                             "prompt, so give a file with one record (or score a benchmark with `dvreward eval`)"
                             ) from None
        try:
            data = json.loads(lines[0])
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON or JSONL ({exc.msg} at line {exc.lineno})") from None
    prompt = data.get("prompt") if isinstance(data, dict) else None
    if isinstance(data, dict):
        data = data.get("questions")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of questions or an object with `questions`")
    return prompt, validate_questions([_question(path, n, q) for n, q in enumerate(data, 1)])


def _question(path: Path, n: int, raw: object) -> Question:
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: question {n} is {type(raw).__name__} {raw!r}; each question is an object "
                         f"such as {QUESTION_SHAPE} (README: Questions)")
    try:
        return Question.model_validate(raw)
    except ValidationError as exc:
        why = "; ".join(validation_problems(exc))
        raise ValueError(f"{path}: question {n}: {why} (README: Questions)") from None


def _score(args: argparse.Namespace) -> int:
    from PIL import Image

    from server.engines.base import EngineError, VerifyItem
    from server.engines.hf.verifier import HFVerifier

    try:
        if args.questions:
            prompt, questions = read_questions(Path(args.questions))
            dec = Decomposition(prompt=args.prompt or prompt or "", questions=tuple(questions))
        elif args.decomposer and args.prompt:
            from server.engines.hf.decomposer import HFDecomposer
            from server.settings import decomposer_limits

            (dec,) = HFDecomposer(
                args.decomposer, args.pipeline, device=args.device, dtype=args.dtype,
                max_new_tokens=setting_default("decomposer_max_new_tokens"),
                limits=decomposer_limits(),
            ).decompose([args.prompt])
        else:
            print("give --questions FILE, or --decomposer PATH with --prompt", file=sys.stderr)
            return 2
        images = [to_rgb(Image.open(p)) for p in args.images]
        verifier = HFVerifier.load(args.verifier, device=args.device, dtype=args.dtype, **verifier_options(args))
    except (OSError, ValueError, ValidationError, DecompositionError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    texts = tuple(q.text for q in dec.questions)
    scores = verifier.verify([VerifyItem((im,), texts) for im in images])
    out = []
    for path, ps in zip(args.images, scores, strict=True):
        b = score_image(list(dec.questions), ps, Aggregation(args.aggregation), Gating(args.gating)).breakdown
        out.append({"image": path, "reward": b.reward, "sc": b.sc, "pq": b.pq,
                    "p": {q.id: v for q, v in zip(dec.questions, ps, strict=True)}})
    print(json.dumps({"prompt": dec.prompt, "questions": [q.model_dump(mode="json") for q in dec.questions],
                      "verifier": args.verifier, "verifier_system_prompt": verifier.system_prompt,
                      "results": out}, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score images in-process and print JSON")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--verifier", required=True, help="verifier checkpoint (local dir or hub id)")
    p.add_argument("--decomposer", help="decomposer checkpoint, used when --questions is not given")
    p.add_argument("--pipeline", choices=setting_choices("pipeline"), default=setting_default("pipeline"))
    p.add_argument("--prompt", help="the generation prompt")
    p.add_argument("--questions",
                   help="JSON list of questions, or one JSON/JSONL record {prompt?, questions} (skips the decomposer)")
    p.add_argument("--aggregation", choices=[a.value for a in Aggregation], default="geometric")
    p.add_argument("--gating", choices=[g.value for g in Gating], default="none")
    p.add_argument("--device", default=setting_default("device"))
    p.add_argument("--dtype", choices=setting_choices("dtype"), default=setting_default("dtype"))
    add_verifier_flags(p)
    p.set_defaults(func=_score)
