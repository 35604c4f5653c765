"""Checks run before anything heavy loads: a busy port, an unreachable Redis or a mistyped model is found
in seconds, not after minutes of loading a 7B checkpoint, and is reported as one line per problem."""

from __future__ import annotations

import errno
import ipaddress
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from server.engines.loading import hub_offline, is_local

if TYPE_CHECKING:
    from server.settings import Settings


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


def _is_loopback(host: str) -> bool | None:
    """Whether every address `host` names is a loopback one; None when it does not resolve (the port check
    reports that)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return None
    return all(ipaddress.ip_address(str(info[4][0]).partition("%")[0]).is_loopback for info in infos)


def exposure_problem(host: str, api_keys: Sequence[str], allow_anonymous: bool) -> str | None:
    """An API without keys that other machines can reach serves anyone: only when the operator says so."""
    if api_keys or allow_anonymous or _is_loopback(host) in (True, None):
        return None
    return (f"--host {host} is reachable from other machines and no API keys are set, so anyone could score: "
            "set DVREWARD_API_KEYS (--api-keys k1,k2), bind --host 127.0.0.1, or set DVREWARD_ALLOW_ANONYMOUS=true "
            "to serve without authentication deliberately")


def redis_problem(url: str, within_s: float) -> str | None:
    """Redis answers PING within `within_s` seconds (a refused connection is retried until then: it may be
    starting); what was tried, and how it failed, otherwise."""
    import redis
    from redis.exceptions import AuthenticationError, AuthorizationError

    from server.settings import masked_url

    deadline = time.monotonic() + within_s
    client = redis.Redis.from_url(url, socket_connect_timeout=within_s, socket_timeout=within_s, retry=None)
    attempts = 0
    try:
        while True:
            attempts += 1
            try:
                client.ping()
                return None
            except (AuthenticationError, AuthorizationError, redis.ResponseError) as exc:
                reason = f"it refused: {exc}"  # answered, so waiting would not help
                break
            except (redis.RedisError, OSError) as exc:
                reason = (str(exc) or type(exc).__name__).rstrip(".")
                if time.monotonic() + 0.2 >= deadline:
                    break
                time.sleep(0.2)
    finally:
        client.close()
    return (f"Redis at {masked_url(url)} did not answer PING (tried {attempts} time(s) for {within_s:g} s, "
            f"DVREWARD_REDIS_TIMEOUT_S): {reason}; start it, or fix --redis-url / DVREWARD_REDIS_URL")


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


def claim_warning(s: Settings) -> str | None:
    """A worker may start with a visibility timeout shorter than its batch timeout (the default: a dead worker's
    tasks come back within a minute, while a slow batch may run for ten); it is said once at start-up, since such a
    batch then keeps its tasks only while its claims are renewed."""
    if s.visibility_timeout_s >= s.batch_timeout_s:
        return None
    return (f"DVREWARD_VISIBILITY_TIMEOUT_S ({s.visibility_timeout_s:g} s) is shorter than DVREWARD_BATCH_TIMEOUT_S "
            f"({s.batch_timeout_s:g} s): a batch running longer than {s.visibility_timeout_s:g} s keeps its tasks only "
            f"while this worker renews their claims (every {s.heartbeat_s:g} s); should Redis miss the renewals for "
            f"{s.visibility_timeout_s:g} s, another worker runs the same tasks too")


def check(s: Settings, *, models: dict[str, str | None] | None = None,
          listen: Sequence[tuple[str, int, str]] = (), api: bool = False, redis: bool = False) -> None:
    """Raise StartupError listing every problem found; nothing is loaded. `listen`: (host, port, flag) each
    address to bind; `api`: the API's address is not open to anyone without keys; `redis`: the queue answers."""
    problems = [port_problem(*address) for address in listen]
    if api:
        problems.append(exposure_problem(s.host, s.api_keys, s.allow_anonymous))
    if redis and s.redis_url:
        problems.append(redis_problem(s.redis_url, s.redis_timeout_s))
    for role, ref in (models or {}).items():
        if ref:
            problems.append(model_problem(role, ref))
    found = [p for p in problems if p]
    if found:
        raise StartupError(found)
