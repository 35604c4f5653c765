"""Flags that decide what an in-process verifier scores (`dvreward score`, `dvreward eval --verifier`).

The same choices as the service's settings, with the same defaults, so offline scores equal served ones.
"""

from __future__ import annotations

import argparse
from typing import Any

from server.engines.prompts import VERIFIER_SYSTEM_PROMPT, read_system_prompt


def add_verifier_flags(p: argparse.ArgumentParser) -> None:
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--verifier-system-prompt", default=None,
                        help="system message of every verifier conversation (default: the service's default)")
    prompt.add_argument("--verifier-system-prompt-file", default=None, help="read the system prompt from this file")
    p.add_argument("--min-pixels", type=int, default=None, help="smallest image area (default: the checkpoint's)")
    p.add_argument("--max-pixels", type=int, default=None, help="largest image area (default: the checkpoint's)")


def verifier_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of HFVerifier.load from the flags; an unreadable prompt file is a ValueError."""
    system_prompt = args.verifier_system_prompt
    if args.verifier_system_prompt_file:
        system_prompt = read_system_prompt(args.verifier_system_prompt_file)
    return {"system_prompt": VERIFIER_SYSTEM_PROMPT if system_prompt is None else system_prompt,
            "min_pixels": args.min_pixels, "max_pixels": args.max_pixels}
