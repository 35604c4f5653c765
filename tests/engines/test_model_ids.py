"""Public model ids: a name and a digest of the checkpoint, never the server's path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from server.engines.loading import checkpoint_digest, public_id, public_name


def test_the_id_names_the_checkpoint_by_content_not_by_path(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    a = tmp_path / "srv" / "models" / "my-verifier"
    shutil.copytree(tiny_models["verifier"], a)
    b = tmp_path / "elsewhere" / "my-verifier"
    shutil.copytree(tiny_models["verifier"], b)
    assert public_id(a) == public_id(b), "the same files give the same id wherever they are"
    assert public_id(a).startswith("my-verifier@sha256:") and "srv" not in public_id(a)
    assert public_id(a, "acme/verifier-v3").startswith("acme/verifier-v3@sha256:")

    original = checkpoint_digest(a)
    config = json.loads((b / "config.json").read_text())
    config["image_token_id"] += 1
    (b / "config.json").write_text(json.dumps(config))
    assert checkpoint_digest(b) != original, "other settings, other digest"

    weights = (a / "model.safetensors").read_bytes()
    assert b'"F32"' in weights[:2**16]
    (a / "model.safetensors").write_bytes(weights.replace(b'"F32"', b'"F16"', 1))
    assert checkpoint_digest(a) != original, "another weights layout, another digest"


def test_a_hub_id_is_its_own_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached: no digest, and no download either
    assert public_name("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert public_id("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"
