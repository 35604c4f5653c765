"""The README's first-hour commands, run as a newcomer runs them: against `dvreward serve` with the tiny models
(as the README's first command starts it), each snippet bounded in time."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service_stack import HOST, ServiceProcess, free_port, service_env

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = re.compile(r"<!-- snippet: ([a-z-]+) -->\n```(bash|python)\n(.*?)```", re.S)
BOUND_S = 120  # a first run must answer in seconds; this bounds a busy 2-core machine


def snippets() -> dict[str, tuple[str, str]]:
    return {name: (lang, code) for name, lang, code in SNIPPET.findall((ROOT / "README.md").read_text())}


@pytest.fixture(scope="module")
def workdir(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A newcomer's directory: the tiny models where `dvreward dev tiny-models ./tiny-models` puts them."""
    root = tmp_path_factory.mktemp("newcomer")
    (root / "tiny-models").symlink_to(tiny_models["verifier"].parent)
    return root


@pytest.fixture(scope="module")
def url(workdir: Path) -> Iterator[str]:
    port = free_port()
    proc = ServiceProcess("serve", ["serve", "--verifier", "./tiny-models/verifier", "--decomposer",
                                    "./tiny-models/decomposer", "--host", HOST, "--port", str(port)],
                          service_env(), workdir, port, cwd=workdir).start()
    try:
        proc.wait_http("/readyz")
        yield proc.url
    finally:
        proc.stop()


def run(name: str, workdir: Path, url: str) -> str:
    lang, code = snippets()[name]
    code = code.replace("http://127.0.0.1:8000", url).replace("127.0.0.1:8000", url.removeprefix("http://"))
    argv = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    env = {**service_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=BOUND_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_snippet_is_tested() -> None:
    assert set(snippets()) == {"try-it", "offline", "client", "step", "multipart"}


def test_try_it(workdir: Path, url: str) -> None:
    out = run("try-it", workdir, url)
    explicit, decomposed = (json.loads(x) for x in re.split(r"\n(?=\{)", out.strip()))
    for body in (explicit, decomposed):
        (group,) = body["groups"]
        assert all(isinstance(r, float) and 0 < r < 1 for r in group["rewards"]), group
    assert decomposed["groups"][0]["questions"] and decomposed["models"]["decomposer"]


def test_multipart(workdir: Path, url: str) -> None:
    (result,) = json.loads(run("multipart", workdir, url))["results"]
    assert result["error"] is None and len(result["p"]) == 2 and all(0 < p < 1 for p in result["p"])


def test_offline(workdir: Path, url: str) -> None:
    out = run("offline", workdir, url)
    assert '"pipeline": "fast"' in out and "reward" in out.lower()


@pytest.mark.parametrize("name", ["client", "step"])
def test_client_snippets(name: str, workdir: Path, url: str) -> None:
    rewards, advantages = run(name, workdir, url).strip().split("] [[")
    assert rewards.startswith("[[") and "nan" not in rewards.lower() and advantages.endswith("]]")
