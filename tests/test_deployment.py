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


def test_compose_api_is_open_to_no_one_without_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API listens on all of its container's addresses: with no keys given (the default), anonymous access is
    allowed deliberately (with the comment saying why) and the port is published on the host's loopback only; and
    `dvreward api`'s own check accepts exactly that configuration, and refuses it without the setting."""
    from server.preflight import exposure_problem

    api = COMPOSE["services"]["api"]
    host = api["command"][api["command"].index("--host") + 1]
    assert host == "0.0.0.0" and api["environment"]["DVREWARD_API_KEYS"] == "${DVREWARD_API_KEYS:-}"
    assert api["environment"]["DVREWARD_ALLOW_ANONYMOUS"] == "true"
    assert api["ports"] and all(str(p).startswith("127.0.0.1:") for p in api["ports"]), api["ports"]
    lines = (ROOT / "docker-compose.yml").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("DVREWARD_ALLOW_ANONYMOUS:"))
    assert lines[at - 1].strip().startswith("#"), "allowing anonymous access needs its reason beside it"
    monkeypatch.setenv("DVREWARD_API_KEYS", "")
    monkeypatch.setenv("DVREWARD_ALLOW_ANONYMOUS", "true")
    s = Settings()
    assert exposure_problem(host, s.api_keys, s.allow_anonymous) is None
    assert exposure_problem(host, s.api_keys, False) is not None


def test_compose_shape() -> None:
    services = COMPOSE["services"]
    assert "healthcheck" in services["redis"] and services["redis"]["volumes"], "redis needs health and persistence"
    assert "--appendonly" in services["redis"]["command"]
    worker = services["worker"]
    assert "ports" not in worker and "container_name" not in worker, "`--scale worker=N` needs no fixed port/name"
    assert any(v.endswith(":/models") for v in worker["volumes"]), "workers share a model cache volume"
    for svc in ("api", "worker"):
        assert services[svc]["depends_on"]["redis"]["condition"] == "service_healthy"
    gpus = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpus["capabilities"] == ["gpu"]
    # compose does not spread `count: 1` over GPUs: one container takes them all, one process per GPU
    assert gpus["count"] == "all" and worker["command"][-2:] == ["--devices", "all"]


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


def test_pixels_default_to_the_checkpoints_everywhere() -> None:
    """Compose, `dvreward serve|worker`, `dvreward score` and `dvreward eval` resize alike: the checkpoint's own."""
    assert Settings.model_fields["min_pixels"].default is None and Settings.model_fields["max_pixels"].default is None
    for spec in COMPOSE["services"].values():
        assert not {"DVREWARD_MIN_PIXELS", "DVREWARD_MAX_PIXELS"} & set(spec.get("environment") or {})
    sub = _subparsers(build_parser())
    for command, args in (("score", ["a.png", "--verifier", "v"]),
                          ("eval", ["--images", "i", "--questions", "q", "-o", "o", "--verifier", "v"])):
        parsed = sub[command].parse_args(args)
        assert (parsed.min_pixels, parsed.max_pixels) == (None, None), command
    with pytest.raises(ValueError, match=r"min_pixels \(5000\) is above max_pixels \(100\)"):
        Settings(min_pixels=5000, max_pixels=100)


def test_readme_and_ci_install_the_cpu_torch_the_same_way() -> None:
    """Both README commands and CI take torch with PyTorch's CPU index as an extra index (its +cpu build wins
    over PyPI's CUDA build; an unreachable index is one retry, not minutes), at the version the suite pins."""
    readme = (ROOT / "README.md").read_text()
    step = re.compile(r"pip install (torch==[\d.]+ --extra-index-url https://download\.pytorch\.org/whl/cpu "
                      r"--retries 1)")
    commands = [line for line in readme.splitlines() if line.startswith("pip install torch")]
    assert len(commands) == 2, "the service command and the test command"
    matches = [step.match(line) for line in commands]
    assert all(matches) and len({m.group(1) for m in matches if m}) == 1, commands
    install = matches[0].group(1) if matches[0] else ""
    assert install in (ROOT / ".ci" / "run").read_text(), "CI installs torch as the README does"
    pinned = re.search(r"^torch==([\d.]+)$", (ROOT / "tests" / "constraints.txt").read_text(), re.M)
    assert pinned and install.startswith(f"torch=={pinned.group(1)} "), "the README installs the pinned torch"


# The Python each base image ships: an image must install no other `pythonX.Y` (the distribution has none).
DISTRO_PYTHON = {"ubuntu20.04": "3.8", "ubuntu22.04": "3.10", "ubuntu24.04": "3.12", "bullseye": "3.9",
                 "bookworm": "3.11", "trixie": "3.13"}


def base_python(image: str) -> str:
    """The Python a base image runs: the official python image's tag, else its distribution's release."""
    name, _, tag = image.partition(":")
    if name in ("python", "docker.io/library/python"):
        return re.match(r"\d+\.\d+", tag).group(0)  # type: ignore[union-attr]
    if name == "vllm/vllm-openai":
        return "3.12"
    release = re.search(r"ubuntu\d\d\.\d\d|bullseye|bookworm|trixie", tag.replace("ubuntu-", "ubuntu")
                        if name != "ubuntu" else f"ubuntu{tag}")
    assert release, f"{image}: unknown base; add its Python to DISTRO_PYTHON"
    return DISTRO_PYTHON[release.group(0)]


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in (ROOT / "docker").glob("*Dockerfile")))
def test_dockerfile_python_is_its_base_images(dockerfile: str) -> None:
    text = (ROOT / "docker" / dockerfile).read_text().replace("\\\n", " ")
    (image,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    python = base_python(image)
    lo = re.search(r'requires-python = ">=(\d+\.\d+)"', (ROOT / "pyproject.toml").read_text())
    assert lo and tuple(map(int, python.split("."))) >= tuple(map(int, lo.group(1).split("."))), \
        f"{dockerfile}: {image} runs Python {python}, below the project's requires-python"
    for named in re.findall(r"python(\d\.\d+)", " ".join(re.findall(r"^RUN (.*)$", text, re.M))):
        assert named == python, f"{dockerfile}: uses python{named}, but {image} has Python {python}"


def test_base_python_table() -> None:
    """The check above would pass vacuously if the table misread the image that issue 12 found broken."""
    assert base_python("nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04") == "3.12"
    assert base_python("python:3.11-slim-bookworm") == "3.11"
    assert base_python("ubuntu:22.04") == "3.10"


def test_readme_tls_redis_url_gives_a_tls_connection_with_the_ca() -> None:
    """The multi-host docs' `rediss://` URL really configures TLS, the CA file and the password."""
    from server.queue.redis_broker import RedisBroker
    from server.runtime import build_broker
    from server.settings import Settings

    readme = (ROOT / "README.md").read_text()
    url = re.search(r'DVREWARD_REDIS_URL="(rediss://[^"]+)"', readme)
    assert url, "README documents no rediss:// URL"
    broker = build_broker(Settings(redis_url=url.group(1).replace("$REDIS_PASSWORD", "pw")))
    assert isinstance(broker, RedisBroker)
    pool = broker.redis.connection_pool
    assert pool.connection_class.__name__ == "SSLConnection"
    assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/dvreward/redis-ca.pem"
    assert pool.connection_kwargs["password"] == "pw"
