"""The `dvreward` command: one subcommand module per job, registered below."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

# Each module exposes `register(subparsers)`, adding its subcommand(s) with
# `set_defaults(func=...)`; the func takes the parsed args and returns an exit code.
COMMAND_MODULES: tuple[str, ...] = (
    "server.commands.dev",
    "server.commands.importer",
    "server.commands.service",
    "server.commands.health",
    "server.commands.score",
    "server.commands.decompose",
    "server.commands.evaluate",
)


DESCRIPTION = """\
DVReward: decompositional verifiable rewards for reinforcement learning of image generators. Serve the
scoring API (`serve`, or `api` and `worker` over Redis), or decompose prompts, score images and evaluate
benchmarks without a server."""

EPILOG = """\
Every setting of `serve`, `api` and `worker` is also a DVREWARD_<NAME> environment variable (see
`dvreward serve --help`). `dvreward eval --server` reads its Bearer key from DVREWARD_API_KEY."""


class OneLineErrors(argparse.ArgumentParser):
    """A mistyped flag or value is one line and exit 2, like every other startup error (argparse would print
    the usage of every settings flag first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="dvreward", description=DESCRIPTION, epilog=EPILOG)
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
