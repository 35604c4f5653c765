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
    try:
        parser = build_parser()
    except ModuleNotFoundError as exc:  # a third-party module: the server's dependencies are not installed here
        if (exc.name or "").partition(".")[0] in ("server", "trainer_client", "dvreward_protocol"):
            raise
        print(f"dvreward: the server's dependencies are not installed here (no module {exc.name!r}); this "
              "environment has the trainer client only. Install the server with: pip install 'dvreward[server]' "
              "(or 'dvreward[api]' for the API process alone).", file=sys.stderr)
        return 2
    from server.preflight import StartupError

    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except StartupError as exc:
        for problem in exc.problems:
            print(f"dvreward {args.command}: error: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
