"""docker-compose.yml and docker/ cannot run here: check they only use commands and settings that exist."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import yaml

from server.cli import build_parser
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _check_command(argv: list[str]) -> None:
    assert argv[0] == "dvreward", argv
    sub = _subparsers(build_parser())
    assert argv[1] in sub, f"`dvreward {argv[1]}` is not a command"
    known = {s for a in sub[argv[1]]._actions for s in a.option_strings}
    for tok in argv[2:]:
        if tok.startswith("--"):
            assert tok in known, f"`dvreward {argv[1]}` has no flag {tok}"
    sub[argv[1]].parse_args(argv[2:])  # values must parse too


@pytest.mark.parametrize("service", ["api", "worker", "worker-vllm", "worker-remote"])
def test_compose_commands_and_settings_exist(service: str) -> None:
    spec = COMPOSE["services"][service]
    _check_command(spec["command"])
    for name in spec["environment"]:
        if name.startswith("DVREWARD_"):
            field = name.removeprefix("DVREWARD_").lower()
            assert field in Settings.model_fields, f"{service}: {name} is not a setting"


def test_compose_environment_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for service in ("api", "worker", "worker-vllm", "worker-remote"):
        for name, value in COMPOSE["services"][service]["environment"].items():
            if name.startswith("DVREWARD_"):
                monkeypatch.setenv(name, re.sub(r"\$\{[A-Z_]+:-(.*)\}", r"\1", str(value)))
        Settings()  # raises on a value of the wrong type


def test_compose_shape() -> None:
    services = COMPOSE["services"]
    assert "healthcheck" in services["redis"] and services["redis"]["volumes"], "redis needs health and persistence"
    assert "--appendonly" in services["redis"]["command"]
    worker = services["worker"]
    assert "ports" not in worker and "container_name" not in worker, "`--scale worker=N` needs no fixed port/name"
    assert any(v.endswith(":/models") for v in worker["volumes"]), "workers share a model cache volume"
    for svc in ("api", "worker"):
        assert services[svc]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


@pytest.mark.parametrize("dockerfile", ["api.Dockerfile", "worker.Dockerfile"])
def test_dockerfile_cmd_exists(dockerfile: str) -> None:
    text = (ROOT / "docker" / dockerfile).read_text()
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd, f"{dockerfile} has no exec-form CMD"
    _check_command(yaml.safe_load(cmd.group(1)))
    assert "COPY server" in text and "COPY trainer_client" in text


def test_api_image_has_no_torch() -> None:
    text = (ROOT / "docker" / "api.Dockerfile").read_text()
    install = " ".join(shlex.split(" ".join(re.findall(r"RUN pip install (.*)", text.replace("\\\n", " ")))))
    assert "torch" not in install and "[server]" not in install


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`DVREWARD_{name.upper()}`" in readme, f"README's settings table lacks DVREWARD_{name.upper()}"
