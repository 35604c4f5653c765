"""Startup of `dvreward serve|api|worker`: list settings parse as users write them, `--help` is readable, and
a busy port or a bad model reference is one line per problem, exit 2, found before any model loads."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.cli import build_parser, main
from server.commands.service import settings_from
from server.preflight import claim_warning, model_problem, port_problem
from server.settings import Settings
from tests.service_stack import STARTUP_S, drop_service_settings, service_env, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("raw", "keys"), [
    ("secret", ["secret"]), ("a, b,c", ["a", "b", "c"]), ('["x", "y"]', ["x", "y"]), ("", []),
])
def test_api_keys_parse_comma_separated_and_json(monkeypatch: pytest.MonkeyPatch, raw: str, keys: list[str]) -> None:
    monkeypatch.setenv("DVREWARD_API_KEYS", raw)
    assert Settings().api_keys == keys
    monkeypatch.delenv("DVREWARD_API_KEYS")
    assert settings_from(build_parser().parse_args(["serve", "--api-keys", raw])).api_keys == keys


def test_a_bad_setting_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DVREWARD_API_KEYS", "[not json")
    monkeypatch.setenv("DVREWARD_PORT", "eighty")
    assert main(["api", "--redis-url", "redis://127.0.0.1:1/0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert any("DVREWARD_API_KEYS / --api-keys" in line and "a,b,c" in line for line in err)
    assert any("DVREWARD_PORT / --port" in line for line in err)


@pytest.mark.parametrize("command", ["serve", "api", "worker"])
def test_help_shows_readable_defaults(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    assert "Undefined" not in text
    assert "default 120.0" in text if command != "worker" else "default 32" in text


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_port_in_use_is_found_before_serving(busy_port: int, redis_url: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert port_problem("127.0.0.1", busy_port) is not None
    assert main(["api", "--redis-url", redis_url, "--port", str(busy_port)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"port {busy_port}" in line and "already in use" in line and "--port" in line


def test_model_references_are_checked(tiny_models: dict[str, Path], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_problem("verifier", str(tiny_models["verifier"])) is None
    assert "no such directory" in (model_problem("verifier", str(tmp_path / "missing")) or "")
    assert "no config.json" in (model_problem("verifier", str(tmp_path)) or "")
    assert "not in the Hugging Face cache" in (model_problem("decomposer", "Qwen/No-Such-Model-1B") or "")
    assert "valid hub id" in (model_problem("decomposer", "bad id with spaces") or "")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVREWARD_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "server.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_every_problem_is_reported_before_any_model_loads(tiny_models: dict[str, Path], busy_port: int) -> None:
    """A good verifier, a mistyped decomposer and a busy port: two lines, no traceback, nothing loaded."""
    out = _cli("serve", "--verifier", str(tiny_models["verifier"]), "--decomposer", "Qwen/Qwen2.5-7B-Instrcut",
               "--port", str(busy_port))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2, out.stderr
    assert "already in use" in lines[0] and "Qwen2.5-7B-Instrcut" in lines[1]
    assert "loading verifier" not in out.stderr and "Traceback" not in out.stderr


def test_a_checkpoint_that_fails_to_load_is_one_line(tmp_path: Path, redis_url: str) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "no_such_architecture"}')
    out = _cli("worker", "--redis-url", redis_url, "--verifier", str(tmp_path), "--decomposer", "")
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "cannot load the verifier" in errors[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("flags", "says"), [
    (["--devices", "cpu", "--device", "cpu"], "not both"),
    (["--devices", "gpu0"], "not a GPU index"),
])
def test_worker_devices_mistakes_are_one_line(flags: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "--redis-url", "redis://127.0.0.1:1/0", *flags]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert says in line


@pytest.mark.parametrize("devices", [[], ["--devices", "cpu,cpu"]], ids=["worker", "supervisor"])
def test_a_busy_worker_metrics_port_is_found_before_any_model_loads(
    devices: list[str], busy_port: int, tiny_models: dict[str, Path], redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A worker's metrics port is checked like the API's; the supervisor checks every child's (base + index)."""
    base = busy_port - len(devices) // 2  # with two workers, the second one's port is the busy one
    assert main(["worker", "--redis-url", redis_url, "--verifier", str(tiny_models["verifier"]),
                 "--decomposer", "", "--worker-metrics-port", str(base), *devices]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"port {busy_port}" in line and "already in use" in line and "--worker-metrics-port" in line


def test_a_worker_whose_claims_lapse_before_its_batch_timeout_says_so_at_start(
    redis_url: str, tiny_models: dict[str, Path], services: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Allowed (a dead worker's tasks come back sooner), but the dependence on renewals is now said once, at start."""
    drop_service_settings(monkeypatch)
    assert claim_warning(Settings(visibility_timeout_s=20, batch_timeout_s=20)) is None
    warning = claim_warning(Settings(visibility_timeout_s=10, batch_timeout_s=20))
    assert warning is not None and "DVREWARD_VISIBILITY_TIMEOUT_S (10 s) is shorter than DVREWARD_BATCH_TIMEOUT_S " \
        "(20 s)" in warning
    env = service_env(redis_url=redis_url, visibility_timeout_s=10, batch_timeout_s=20,
                      verifier=tiny_models["verifier"], decomposer="")
    worker = services("worker-claims", "worker", env)
    wait_for(lambda: "ready; SIGTERM drains" in worker.log_tail() or not worker.alive(), STARTUP_S, "the worker")
    assert f"WARNING dvreward: {warning}" in worker.log_tail(), worker.log_tail()
