"""Fixtures of the service tests: a private real Redis, real service processes, tiny real models.

Nothing here fakes Redis, HTTP or a model. Every process a fixture starts is killed (by its own
pid) in the fixture's teardown, and all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service_stack import (
    HOST,
    STARTUP_S,
    ServiceProcess,
    drop_service_settings,
    free_port,
    serve_in_thread,
    service_env,
    wait_for,
)


# ---- images ------------------------------------------------------------------------------------
def png_bytes(seed: int = 0, size: tuple[int, int] = (32, 32)) -> bytes:
    """A small noise PNG; different seeds give different images (and different rewards)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_b64(seed: int = 0, size: tuple[int, int] = (32, 32)) -> str:
    return b64(png_bytes(seed, size))


def explicit_questions() -> list[dict[str, Any]]:
    return [
        {"id": "cat", "text": "Is there a cat?", "tag": "Existence"},
        {"id": "red", "text": "Is the cat red?", "tag": "Attribute", "depends_on": ["cat"]},
        {"id": "sharp", "text": "Does the image look sharp?", "kind": "quality", "tag": "Texture"},
    ]


# The embedded server's limits are low, so the bad-input tests reach them with small requests.
EMBEDDED_LIMITS = dict(max_images=6, max_questions=6, max_prompt_chars=300, max_body_bytes=200_000,
                       max_image_pixels=1_000_000, max_groups=4, request_timeout_s=60)


@pytest.fixture(scope="session")
def embedded_server(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`dvreward serve` (embedded queue, no Redis) with the tiny models; yields its base URL."""
    port = free_port()
    proc = ServiceProcess(
        "serve",
        ["serve", "--verifier", str(tiny_models["verifier"]), "--decomposer", str(tiny_models["decomposer"]),
         "--host", HOST, "--port", str(port)],
        service_env(**EMBEDDED_LIMITS), tmp_path_factory.mktemp("serve"), port,
    )
    proc.start()
    try:
        proc.wait_http("/readyz")
        yield proc.url
        assert proc.alive(), f"the embedded server died during the tests:\n{proc.log_tail()}"
    finally:
        proc.stop()


@pytest.fixture
def embedded_client(embedded_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=embedded_server, timeout=120) as c:
        yield c


# ---- in-process models and servers -------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_verifier(tiny_models: dict[str, Path]) -> Any:
    """The tiny verifier loaded in this process exactly as a worker loads it (same settings)."""
    from server.runtime import load_verifier
    from server.settings import Settings

    with pytest.MonkeyPatch.context() as mp:  # the service processes see no DVREWARD_ setting either
        drop_service_settings(mp)
        return load_verifier(Settings(verifier=str(tiny_models["verifier"]), decomposer=""))


def local_p(verifier: Any, images: list[bytes], questions: list[str]) -> list[list[float]]:
    """p per question of each image, computed in this process by the same engine a worker runs."""
    from server.engines.base import VerifyItem
    from server.images import load_image

    return verifier.verify([VerifyItem((load_image(b, 10**8),), tuple(questions)) for b in images])


def local_rewards(verifier: Any, images: list[bytes], questions: list[dict[str, Any]]) -> list[float]:
    """The default reward (geometric, no gating) of each image, computed in this process."""
    from dvreward_protocol.questions import Question
    from dvreward_protocol.reward import aggregate

    qs = [Question.model_validate(q) for q in questions]
    return [aggregate(qs, dict(zip([q.id for q in qs], p, strict=True))).reward
            for p in local_p(verifier, images, [q.text for q in qs])]


@pytest.fixture(scope="session")
def kit() -> types.SimpleNamespace:
    """The helpers above for test modules (conftest is not importable under --import-mode=importlib)."""
    return types.SimpleNamespace(
        png_bytes=png_bytes, png_b64=png_b64, b64=b64, explicit_questions=explicit_questions, wait_for=wait_for,
        free_port=free_port, service_env=service_env, serve_in_thread=serve_in_thread, local_p=local_p,
        local_rewards=local_rewards, HOST=HOST, STARTUP_S=STARTUP_S,
        ServiceProcess=ServiceProcess,
    )
