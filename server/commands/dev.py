"""`dvreward dev ...`: developer tooling (tiny random models for offline runs and tests, the README's settings
table)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from server.engines.tiny import VERIFIER_ARCHS


def _tiny_models(args: argparse.Namespace) -> int:
    from server.engines.tiny import write_tiny_models

    paths = write_tiny_models(Path(args.dir), seed=args.seed, arch=args.arch)
    print(json.dumps(paths, indent=2))
    return 0


def _settings_table(args: argparse.Namespace) -> int:
    from server.settings_table import markdown

    print(markdown(), end="")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    dev = sub.add_parser("dev", help="developer tools").add_subparsers(dest="dev_command", required=True)
    p = dev.add_parser("tiny-models", help="write a tiny random verifier and decomposer to DIR")
    p.add_argument("dir", help="output directory; DIR/verifier and DIR/decomposer are created")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=VERIFIER_ARCHS, default=VERIFIER_ARCHS[0],
                   help="verifier architecture")
    p.set_defaults(func=_tiny_models)
    p = dev.add_parser("settings-table", help="print the README's settings table (markdown), generated from Settings")
    p.set_defaults(func=_settings_table)
