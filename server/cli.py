"""The `dvreward` command: one subcommand module per job, registered below."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each module exposes `register(subparsers)`, adding its subcommand(s) with
# `set_defaults(func=...)`; the func takes the parsed args and returns an exit code.
COMMAND_MODULES: tuple[str, ...] = (
    "server.commands.dev",
    "server.commands.importer",
    "server.commands.service",
    "server.commands.score",
    "server.commands.decompose",
    "server.commands.evaluate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dvreward", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from server.preflight import StartupError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except StartupError as exc:
        for problem in exc.problems:
            print(f"dvreward {args.command}: error: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
