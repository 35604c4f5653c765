"""Real services for the client tests: `dvreward serve` subprocesses with tiny models (embedded and Redis-backed)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REDIS_SERVER = os.environ.get("DVREWARD_TEST_REDIS_SERVER", "/usr/bin/redis-server")
QUESTIONS = [
    {"id": "cube", "text": "Is there a cube?", "tag": "Existence"},
    {"id": "red", "text": "Is the cube red?", "tag": "Attribute", "depends_on": ["cube"]},
    {"id": "shape", "text": "Are the edges of the cube straight?", "kind": "quality", "tag": "Geometry"},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(proc: subprocess.Popen, ready: callable, log: Path, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not ready after {timeout}s:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def serve(models: dict[str, Path], log: Path, *extra: str) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--verifier", str(models["verifier"]),
           "--decomposer", str(models["decomposer"]), "--port", str(port), *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def ready() -> bool:
        try:
            return httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        _wait(proc, ready, log, "dvreward serve")
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def service_url(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(tiny_models, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which(REDIS_SERVER) or shutil.which("redis-server")
    if not binary:
        pytest.skip(f"REDIS-BACKED CLIENT TESTS SKIPPED: no redis-server binary at {REDIS_SERVER} or on PATH")
    port = free_port()
    log = tmp_path_factory.mktemp("redis") / "redis.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                 "no"], stdout=out, stderr=subprocess.STDOUT)

    def ready() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        return False

    try:
        _wait(proc, ready, log, "redis-server", timeout=20)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def redis_service_url(tiny_models: dict[str, Path], redis_url: str,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(tiny_models, tmp_path_factory.mktemp("serve-redis") / "serve.log", "--redis-url", redis_url) as url:
        yield url


@pytest.fixture(params=["embedded", "redis"])
def any_service_url(request: pytest.FixtureRequest) -> str:
    """The same test against the embedded queue and against Redis."""
    return request.getfixturevalue("service_url" if request.param == "embedded" else "redis_service_url")


@pytest.fixture
def questions() -> list[dict]:
    return [dict(q) for q in QUESTIONS]


def images_scored(url: str) -> float:
    """dvreward_images_total summed over outcomes: how many images the service actually scored."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(r"^dvreward_images_total\{[^}]*\} (\S+)$", text, re.M))


@pytest.fixture
def scored_count() -> callable:
    return images_scored


@pytest.fixture
def make_images() -> callable:
    """n distinct uint8 HWC images (coloured blocks plus noise), reproducible from the seed."""
    import numpy as np

    def make(n: int, seed: int = 0, size: int = 40) -> list:
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) // 4
            y, x = rng.integers(0, size // 2, 2)
            a[y:y + size // 2, x:x + size // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
            out.append(a)
        return out

    return make


@pytest.fixture
def truncated_png() -> bytes:
    """A PNG cut inside its pixel data: passes the API's header checks, fails decoding in the worker."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]
