"""Shared fixtures: tiny random models built once per session through the real writer."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from server.engines.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("tiny-models")
    paths = write_tiny_models(root)
    return {k: Path(v) for k, v in paths.items()}
