"""The README's settings table, generated from Settings (`dvreward dev settings-table`) so that the two cannot
drift apart: tests/test_deployment.py checks that the README holds exactly this table."""

from __future__ import annotations

import typing

from server.commands.service import API_SETTINGS, WORKER_SETTINGS, flag, shown_default
from server.settings import YEAR_S, Settings

# A default too long for a table cell is shown by where it is explained.
LONG_DEFAULTS = {"verifier_system_prompt": "built in (see [the reward](#the-reward-exactly-as-the-method-defines-it))"}
COMMANDS = (("serve", frozenset[str]()), ("api", WORKER_SETTINGS), ("worker", API_SETTINGS))


def _commands(name: str) -> str:
    return ", ".join(command for command, skipped in COMMANDS if name not in skipped)


def _default(name: str) -> str:
    if name in LONG_DEFAULTS:
        return LONG_DEFAULTS[name]
    shown = shown_default(Settings.model_fields[name].get_default(call_default_factory=True))
    return shown if shown in ("unset", "none") else f"`{shown}`"


def _bound(value: object) -> str:
    return "a year" if value == YEAR_S else f"{value:g}" if isinstance(value, float) else str(value)


def _allowed(name: str) -> str:
    """The setting's bounds, or its choices."""
    field = Settings.model_fields[name]
    choices = [a for a in typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal]
    if choices:
        return ", ".join(f"`{c}`" for c in choices)
    signs = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}
    bounds = [f"{sign} {_bound(getattr(m, key))}" for m in field.metadata for key, sign in signs.items()
              if hasattr(m, key)]
    return ", ".join(bounds + ["not empty" for m in field.metadata if getattr(m, "min_length", 0) == 1])


def markdown() -> str:
    rows = ["| environment | flag | commands | default | allowed | meaning |", "|---|---|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        cells = [f"`DVREWARD_{name.upper()}`", f"`{flag(name)}`", _commands(name), _default(name), _allowed(name),
                 field.description or ""]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"
