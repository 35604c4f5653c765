"""Real services for the client tests: `dvreward serve` subprocesses with tiny models (embedded and Redis-backed)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service_stack import HOST, RedisProcess, ServiceProcess, free_port, service_env

QUESTIONS = [
    {"id": "cube", "text": "Is there a cube?", "tag": "Existence"},
    {"id": "red", "text": "Is the cube red?", "tag": "Attribute", "depends_on": ["cube"]},
    {"id": "shape", "text": "Are the edges of the cube straight?", "kind": "quality", "tag": "Geometry"},
]


@contextlib.contextmanager
def serve(models: dict[str, Path], logdir: Path, *extra: str) -> Iterator[str]:
    """`dvreward serve` with the tiny models and default settings (none from the environment)."""
    port = free_port()
    proc = ServiceProcess("serve", ["serve", "--verifier", str(models["verifier"]), "--decomposer",
                                    str(models["decomposer"]), "--host", HOST, "--port", str(port), *extra],
                          service_env(), logdir, port).start()
    try:
        proc.wait_http("/readyz")
        yield proc.url
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def service_url(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(tiny_models, tmp_path_factory.mktemp("serve")) as url:
        yield url


@pytest.fixture(scope="session")
def redis_service_url(tiny_models: dict[str, Path], redis_server: RedisProcess,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Over a Redis of its own (the shared one is flushed between service tests); redis_server gives the skip."""
    redis = RedisProcess(tmp_path_factory.mktemp("redis-client"))
    redis.start()
    try:
        with serve(tiny_models, tmp_path_factory.mktemp("serve-redis"), "--redis-url", redis.url) as url:
            yield url
    finally:
        redis.kill()


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
