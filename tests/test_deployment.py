"""docker-compose.yml and docker/ cannot run here: check they only use commands and settings that exist."""

from __future__ import annotations

import argparse
import os
import re
import shlex
from pathlib import Path
from typing import Any

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


SERVICES = ["api", "worker", "worker-vllm", "worker-remote", "worker-paper"]


@pytest.mark.parametrize("service", SERVICES)
def test_compose_commands_and_settings_exist(service: str) -> None:
    spec = COMPOSE["services"][service]
    _check_command(spec["command"])
    for name in spec["environment"]:
        if name.startswith("DVREWARD_"):
            field = name.removeprefix("DVREWARD_").lower()
            assert field in Settings.model_fields, f"{service}: {name} is not a setting"


def test_compose_environment_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Answer yes or no.")
    for service in SERVICES:
        for name in [k for k in os.environ if k.startswith("DVREWARD_")]:
            monkeypatch.delenv(name)
        for name, value in COMPOSE["services"][service]["environment"].items():
            if name.startswith("DVREWARD_"):
                value = str(prompt) if name == "DVREWARD_VERIFIER_SYSTEM_PROMPT_FILE" else _default(str(value))
                monkeypatch.setenv(name, value)
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


def _gpu_reservations() -> dict[str, dict[str, Any]]:
    return {name: spec["deploy"]["resources"]["reservations"]["devices"][0]
            for name, spec in COMPOSE["services"].items() if "deploy" in spec}


def _default(value: str) -> str:
    """A compose `${VAR:-default}` (or `${VAR-default}`) as it reads with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:?-([^}]*)\}", r"\1", value)


def test_compose_paper_profile_is_the_papers_reward() -> None:
    """`--profile paper`: the paper's verifier and dtype on vLLM, and the system prompt file the user pastes (its
    text is not shipped; compose refuses to start without the file)."""
    from server.paper import PAPER_DTYPE, PAPER_VERIFIER

    spec = COMPOSE["services"]["worker-paper"]
    env = spec["environment"]
    assert spec["profiles"] == ["paper"] and _default(env["DVREWARD_VERIFIER"]) == PAPER_VERIFIER
    assert (env["DVREWARD_DTYPE"], env["DVREWARD_VERIFIER_ENGINE"], env["DVREWARD_DECOMPOSER"]) == (
        PAPER_DTYPE, "vllm", "")
    mount = f":{env['DVREWARD_VERIFIER_SYSTEM_PROMPT_FILE']}:ro"
    assert any(v.startswith("${PAPER_SYSTEM_PROMPT_FILE:?") and v.endswith(mount) for v in spec["volumes"])
    assert _default(COMPOSE["services"]["api"]["environment"]["DVREWARD_DECOMPOSER"]) != "", "a default remains"
    assert "${DVREWARD_DECOMPOSER-" in COMPOSE["services"]["api"]["environment"]["DVREWARD_DECOMPOSER"], \
        "the API's decomposer can be set empty (the paper profile has none)"


def test_compose_pins_each_single_gpu_service_to_its_own_gpu() -> None:
    """`count: 1` put verifier-server and worker-remote both on GPU 0 (where the vLLM server takes 90%)."""
    gpus = _gpu_reservations()
    assert gpus["worker"]["count"] == "all"  # one process per GPU, by the supervisor
    for name, spec in gpus.items():
        assert spec["capabilities"] == ["gpu"]
        if name != "worker":
            assert "count" not in spec and len(spec["device_ids"]) == 1, f"{name}: pin its GPU with device_ids"
    by_profile: dict[str, list[str]] = {}
    for name, spec in COMPOSE["services"].items():
        if name in gpus and name != "worker":
            by_profile.setdefault(spec["profiles"][0], []).append(_default(gpus[name]["device_ids"][0]))
    assert sorted(by_profile["remote"]) == ["0", "1"], by_profile


def test_compose_pins_the_vllm_image_to_a_version_the_engine_supports() -> None:
    from packaging.version import Version

    image = COMPOSE["services"]["verifier-server"]["image"]
    name, _, tag = image.partition(":")
    assert name == "vllm/vllm-openai" and re.fullmatch(r"v\d+\.\d+\.\d+", tag), f"{image}: pin a release"
    floor = re.search(r'vllm = \["vllm>=([\d.]+)"\]', (ROOT / "pyproject.toml").read_text())
    assert floor and Version(tag[1:]) >= Version(floor.group(1)), "the server must have logprob_token_ids"


def test_images_run_as_an_unprivileged_user() -> None:
    for dockerfile in sorted((ROOT / "docker").glob("*Dockerfile")):
        text = dockerfile.read_text()
        users = re.findall(r"^USER\s+(\S+)", text, re.M)
        assert users and users[-1] not in ("root", "0"), f"{dockerfile.name} runs as root"
        cmd = text.index("\nCMD ")
        assert text.rindex("\nUSER ") < cmd
    worker = (ROOT / "docker" / "worker.Dockerfile").read_text()
    owned = re.search(r"chown (\S+?):\S+ /models", worker)
    assert owned and owned.group(1) == re.findall(r"^USER\s+(\S+)", worker, re.M)[-1]
    assert worker.index("chown") < worker.index("VOLUME"), "a volume's content is fixed at VOLUME"


def test_a_volume_is_shared_only_by_images_of_one_user() -> None:
    """The vLLM image runs as root; a cache it creates first would be root's, unwritable for the workers."""
    mounted: dict[str, set[str]] = {}
    for spec in COMPOSE["services"].values():
        image = spec["build"]["dockerfile"] if "build" in spec else spec["image"]
        for volume in spec.get("volumes", []):
            mounted.setdefault(volume.split(":")[0], set()).add(image)
    assert all(len(images) == 1 for images in mounted.values()), mounted


def test_workers_have_a_healthcheck_that_is_a_real_command() -> None:
    text = (ROOT / "docker" / "worker.Dockerfile").read_text()
    check = re.search(r"^HEALTHCHECK .*CMD (\[.*\])$", text, re.M)
    assert check, "worker.Dockerfile has no exec-form HEALTHCHECK"
    _check_command(yaml.safe_load(check.group(1)))
    for name, spec in COMPOSE["services"].items():
        if spec.get("build", {}).get("dockerfile") == "docker/worker.Dockerfile":
            assert not spec.get("healthcheck", {}).get("disable"), name


def test_readme_gives_gpu_memory_per_configuration() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**GPU memory.**"):]
    section = section[:section.index("\n\n", section.index("|"))]
    for needle in ("`docker compose up`", "`--profile vllm`", "`--profile remote`", "Qwen3-VL-30B-A3B"):
        assert needle in section, needle


def test_compose_shape() -> None:
    services = COMPOSE["services"]
    assert "healthcheck" in services["redis"] and services["redis"]["volumes"], "redis needs health and persistence"
    assert "--appendonly" in services["redis"]["command"]
    worker = services["worker"]
    assert "ports" not in worker and "container_name" not in worker, "`--scale worker=N` needs no fixed port/name"
    assert any(v.endswith(":/models") for v in worker["volumes"]), "workers share a model cache volume"
    for svc in ("api", "worker"):
        assert services[svc]["depends_on"]["redis"]["condition"] == "service_healthy"
    # compose does not spread `count: 1` over GPUs: one container takes them all, one process per GPU
    assert _gpu_reservations()["worker"]["count"] == "all" and worker["command"][-2:] == ["--devices", "all"]


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


def test_readme_settings_table_is_the_generated_one() -> None:
    """Written by hand it listed the decomposer caps twice, pointed "(see below)" up and showed `''` for a
    setting that may never be empty; now `dvreward dev settings-table` writes it from Settings."""
    from server.settings_table import markdown

    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- settings-table[^>]*-->\n(.*?)<!-- /settings-table -->", readme, re.S)
    assert table, "README.md has no settings table between <!-- settings-table --> markers"
    assert table.group(1) == markdown(), "regenerate it: dvreward dev settings-table"
    rows = [line.split(" | ")[0].strip("| `") for line in markdown().splitlines()[2:]]
    assert rows == [f"DVREWARD_{name.upper()}" for name in Settings.model_fields], "each setting once, in order"
    anchors = re.findall(r"\]\(#([a-z0-9-]+)\)", table.group(1))
    headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", readme, re.M)}
    assert anchors and set(anchors) <= headings, "the table's links point at headings of the README"


def test_every_dvreward_variable_the_code_reads_is_documented() -> None:
    """`dvreward eval` read DVREWARD_API_KEY, which the README never named."""
    readme = (ROOT / "README.md").read_text()
    read = set()
    reads = re.compile(r"(?:environ\.get\(|environ\[|getenv\()\s*[\"'](DVREWARD_[A-Z_]+)")
    for package in ("server", "trainer_client", "dvreward_protocol"):
        for path in (ROOT / package).rglob("*.py"):
            read |= set(reads.findall(path.read_text()))
    assert "DVREWARD_API_KEY" in read
    assert [name for name in sorted(read) if f"`{name}`" not in readme] == []


def test_dvreward_help_is_written_for_users(capsys: pytest.CaptureFixture[str]) -> None:
    """It showed the CLI module's docstring, written for developers."""
    import server.cli

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join((server.cli.__doc__ or "").split()) not in text
    assert "rewards for reinforcement learning of image generators" in text and "DVREWARD_API_KEY" in text


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
