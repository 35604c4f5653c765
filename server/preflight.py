"""Checks run before anything heavy loads: a busy port or a mistyped model is found in a second, not
after minutes of loading a 7B checkpoint, and is reported as one line per problem."""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from server.engines.loading import hub_offline, is_local


class StartupError(Exception):
    """Why the command cannot start: one line per problem, no traceback."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def settings_problems(exc: ValidationError) -> list[str]:
    """One line per invalid setting, naming both its environment variable and its flag."""
    lines = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        where = f"DVREWARD_{name.upper()} / --{name.replace('_', '-')}" if name else "settings"
        lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return lines


def port_problem(host: str, port: int, flag: str = "--port") -> str | None:
    """Bind the address the way uvicorn will (SO_REUSEADDR), then let it go; `flag` is the setting to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use: stop what holds it or pass {flag} N"
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or Path(ref).expanduser().exists()


def model_problem(role: str, ref: str) -> str | None:
    """A local checkpoint directory, or a hub id that is cached (offline) or exists on the hub (online)."""
    hint = f"pass --{role} PATH to a checkpoint directory (or build offline ones with `dvreward dev tiny-models DIR`)"
    path = Path(ref).expanduser()
    if is_local(ref):
        if not (path / "config.json").is_file():
            return f"--{role} {ref}: the directory holds no config.json, so it is not a model checkpoint"
        return None
    if _looks_like_path(ref):
        what = "is a file, not a checkpoint directory" if path.exists() else "no such directory"
        return f"--{role} {ref}: {what}; {hint}"
    from huggingface_hub import file_exists, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        if isinstance(try_to_load_from_cache(ref, "config.json"), str):
            return None
        if hub_offline():
            return (f"--{role} {ref}: not a local directory, and not in the Hugging Face cache "
                    f"(HF_HUB_OFFLINE is set); {hint}")
        if file_exists(ref, "config.json"):
            return None
        return f"--{role} {ref}: not a local directory, and the hub has no model {ref!r} with a config.json; {hint}"
    except HFValidationError:
        return f"--{role} {ref}: neither a local directory nor a valid hub id (owner/name); {hint}"
    except Exception as exc:  # noqa: BLE001 - any failure to reach the hub is reported in one line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"--{role} {ref}: not a local directory, and the hub could not be reached ({reason}); {hint}"


def check(*, models: dict[str, str | None] | None = None, listen: Sequence[tuple[str, int, str]] = ()) -> None:
    """Raise StartupError listing every problem found; nothing is loaded. `listen`: (host, port, flag) each."""
    problems = [port_problem(*address) for address in listen]
    for role, ref in (models or {}).items():
        if ref:
            problems.append(model_problem(role, ref))
    found = [p for p in problems if p]
    if found:
        raise StartupError(found)
