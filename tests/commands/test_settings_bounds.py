"""Every numeric setting is bounded, and every misconfiguration of `dvreward serve|api|worker` is one line and
exit 2, found before anything loads: out-of-range values (each setting, each command), the cross-field rules,
Redis URLs of the wrong form, empty API keys, an open address without keys, and a Redis that does not answer."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import annotated_types
import pytest

from server.commands.service import API_SETTINGS, WORKER_SETTINGS, flag
from server.preflight import exposure_problem
from server.settings import Settings
from tests.service_stack import RedisProcess, free_port, service_env

COMMANDS = ("serve", "api", "worker")
SKIPPED = {"serve": set(), "api": WORKER_SETTINGS, "worker": API_SETTINGS}  # settings a command has no flag for
UNUSED_REDIS = "redis://127.0.0.1:1/0"  # well-formed; never reached when a setting is refused first


def numeric_settings() -> dict[str, type]:
    """int and float settings (Optional ones too), by name."""
    out = {}
    for name, field in Settings.model_fields.items():
        args = [a for a in typing.get_args(field.annotation) if a is not type(None)] or [field.annotation]
        if len(args) == 1 and args[0] in (int, float):
            out[name] = args[0]
    return out


def bounds(name: str) -> dict[str, float]:
    return {k: getattr(m, k) for m in Settings.model_fields[name].metadata
            for k in ("ge", "gt", "le", "lt") if isinstance(m, annotated_types.BaseMetadata) and hasattr(m, k)}


def out_of_range(name: str, kind: type) -> list[Any]:
    """A value just past each bound of the setting."""
    b = bounds(name)
    values: list[Any] = []
    if "gt" in b:
        values.append(b["gt"])
    if "ge" in b:
        values.append(b["ge"] - 1 if kind is int or b["ge"] <= 0 else b["ge"] / 2)
    if "le" in b:
        values.append(b["le"] + 1)
    return [kind(v) for v in values]


def test_every_numeric_setting_has_a_lower_bound() -> None:
    """A new numeric setting without bounds fails here (and `--batch-size 0` spun a worker at 100% CPU)."""
    numeric = numeric_settings()
    assert {"batch_size", "port", "max_queue", "result_ttl_s", "heartbeat_s"} <= set(numeric)
    assert [n for n in numeric if not {"ge", "gt"} & set(bounds(n))] == []
    assert bounds("port") == {"ge": 1, "le": 65535}


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, k in numeric_settings().items() for v in out_of_range(n, k)])
def test_each_bound_is_enforced_in_process(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name):
        Settings(**{name: value})


def test_infinity_and_nan_are_refused() -> None:
    for value in ("inf", "nan"):
        with pytest.raises(ValueError, match="finite number"):
            Settings(request_timeout_s=value)


def _run(command: str, flags: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", command, *flags], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _one_error(out: subprocess.CompletedProcess[str], command: str) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, (out.returncode, out.stderr)
    assert lines[0].startswith(f"dvreward {command}: error: "), lines[0]
    return lines[0]


def _case(command: str, settings: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """Flags for the settings the command offers, the environment for the others (which it reads all the same)."""
    flags = [] if command == "serve" else ["--redis-url", UNUSED_REDIS]
    env = {}
    for name, value in settings.items():
        if name in SKIPPED[command]:
            env[name] = value
        else:
            flags += [flag(name), str(value)]
    return flags, service_env(**env)


CROSS_FIELD = [
    ({"visibility_timeout_s": 6, "heartbeat_s": 2}, "visibility_timeout_s (6) must exceed 3 x heartbeat_s"),
    ({"visibility_timeout_s": 10, "heartbeat_s": 3, "batch_wait_ms": 1500}, "3 x heartbeat_s + batch_wait_ms"),
    ({"batch_wait_ms": 5000, "batch_timeout_s": 5}, "batch_wait_ms (5000) must be shorter than batch_timeout_s"),
    ({"min_pixels": 5000, "max_pixels": 100}, "min_pixels (5000) is above max_pixels (100)"),
    ({"max_body_bytes": 1000, "max_inflight_bytes": 500}, "max_inflight_bytes (500) is below max_body_bytes (1000)"),
    ({"max_inflight_requests": 64, "redis_max_connections": 64}, "redis_max_connections (64) must exceed max_inflight"),
    ({"lock_ttl_s": 5, "redis_timeout_s": 3}, "lock_ttl_s (5) must be at least 2 x redis_timeout_s"),
    ({"cache_max_bytes": 2**20, "idempotency_max_bytes": 2**21}, "cache_max_bytes (1048576) is below idempotency_max"),
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_out_of_range_setting_is_one_line_and_exit_2(command: str) -> None:
    """Each numeric setting past each of its bounds, then each cross-field rule, as `dvreward <command>` sees them:
    one line naming the setting, exit 2, before anything loads (subprocesses, four at a time)."""
    cases = [({n: v}, f"DVREWARD_{n.upper()} / {flag(n)}: ")
             for n, kind in numeric_settings().items() for v in out_of_range(n, kind)]
    cases += [(settings, says) for settings, says in CROSS_FIELD]
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda case: _run(command, *_case(command, case[0])), cases))
    for (settings, says), out in zip(cases, runs, strict=True):
        line = _one_error(out, command)
        assert says in line, (settings, line)


@pytest.mark.parametrize(("command", "flags", "says"), [
    (command, ["--redis-url", url], says)
    for command in COMMANDS
    for url, says in [("notaurl", "'notaurl' is not a Redis URL"), ("redis://:hunter2@/0", "names no host"),
                      ("redis://127.0.0.1:70000/0", "Port out of range"), ("redis://127.0.0.1:6379/zero",
                                                                            "must be a database number")]
] + [(command, ["--port", "70000"], "DVREWARD_PORT / --port: Input should be less than or equal to 65535")
     for command in ("serve", "api")])
def test_a_redis_url_or_port_of_the_wrong_form_is_one_line(command: str, flags: list[str], says: str) -> None:
    """Both ended in tracebacks with exit 1."""
    if command == "api" and "--port" in flags:
        flags = [*flags, "--redis-url", UNUSED_REDIS]
    line = _one_error(_run(command, flags, service_env()), command)
    assert says in line and "hunter2" not in line, line
    assert "Traceback" not in line


@pytest.mark.parametrize("raw", [",", " , ", "k1,", "k1,,k2", '["k1", ""]'])
def test_empty_api_key_entries_are_refused(raw: str) -> None:
    """`,` (or `${UNSET},`) used to parse as no keys, which turned authentication off."""
    with pytest.raises(ValueError, match="is empty"):
        Settings(api_keys=raw)
    line = _one_error(_run("api", ["--redis-url", UNUSED_REDIS], service_env(api_keys=raw)), "api")
    assert "DVREWARD_API_KEYS / --api-keys: entry" in line and "is empty" in line


def test_an_unset_variable_is_no_keys_not_an_empty_key() -> None:
    assert Settings(api_keys="").api_keys == [] and Settings(api_keys="  ").api_keys == []


@pytest.mark.parametrize(("host", "keys", "anonymous", "refused"), [
    ("0.0.0.0", [], False, True), ("::", [], False, True), ("0.0.0.0", ["k"], False, False),
    ("0.0.0.0", [], True, False), ("127.0.0.1", [], False, False), ("127.0.0.2", [], False, False),
    ("::1", [], False, False), ("localhost", [], False, False),
])
def test_an_open_address_without_keys_needs_allow_anonymous(host: str, keys: list[str], anonymous: bool,
                                                           refused: bool) -> None:
    problem = exposure_problem(host, keys, anonymous)
    assert (problem is not None) is refused, problem
    if refused:
        assert "DVREWARD_API_KEYS" in problem and "DVREWARD_ALLOW_ANONYMOUS=true" in problem  # type: ignore[operator]


def test_serving_on_all_interfaces_without_keys_is_refused_at_startup(redis_server: RedisProcess) -> None:
    line = _one_error(_run("api", ["--host", "0.0.0.0", "--port", str(free_port()), "--redis-url", redis_server.url],
                           service_env()), "api")
    assert "--host 0.0.0.0 is reachable from other machines and no API keys are set" in line


# ---- Redis must answer before api / worker start ---------------------------------------------------------------
@pytest.fixture
def frozen_redis(private_redis: RedisProcess) -> Iterator[RedisProcess]:
    """A Redis that accepts connections and never answers (SIGSTOP), as a stalled host does."""
    assert private_redis.proc is not None
    private_redis.proc.send_signal(signal.SIGSTOP)
    yield private_redis
    private_redis.proc.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("command", ["api", "worker"])
@pytest.mark.parametrize("state", ["nothing listening", "frozen"])
def test_a_redis_that_does_not_answer_is_one_line_within_the_redis_timeout(
    command: str, state: str, tiny_models: dict[str, Path], request: pytest.FixtureRequest,
) -> None:
    """It used to show only after start (the worker warned every second, forever); now one line with the URL
    tried (password masked), the attempts and the bound, and exit 2."""
    port = request.getfixturevalue("frozen_redis").port if state == "frozen" else free_port()
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    flags = ["--redis-url", url, "--redis-timeout-s", "1"]
    if command == "worker":
        flags += ["--verifier", str(tiny_models["verifier"]), "--decomposer", ""]
    else:
        flags += ["--port", str(free_port())]
    t0 = time.monotonic()
    line = _one_error(_run(command, flags, service_env(), timeout=60), command)
    assert time.monotonic() - t0 < 30, "bounded by DVREWARD_REDIS_TIMEOUT_S (1 s) plus the interpreter's start"
    assert f"Redis at redis://:***@127.0.0.1:{port}/0 did not answer PING" in line and "for 1 s" in line, line
    assert "hunter2" not in line
