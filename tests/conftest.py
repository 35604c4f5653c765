"""Shared fixtures: tiny random models built once per session through the real writer."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never reach a hub: set before transformers / huggingface_hub are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from server.engines.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("tiny-models")
    paths = write_tiny_models(root)
    return {k: Path(v) for k, v in paths.items()}
