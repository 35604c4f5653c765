"""Resolving a model reference (local directory or hub id) with errors a user can act on."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


def is_local(ref: str | Path) -> bool:
    return Path(ref).expanduser().is_dir()


def hub_offline() -> bool:
    """Read at call time: huggingface_hub reads HF_HUB_OFFLINE only once, at import."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def pretrained_kwargs(ref: str | Path) -> dict[str, Any]:
    """A local directory never touches the network, so a typo cannot turn into a download."""
    return {"local_files_only": True} if is_local(ref) or hub_offline() else {}


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return "auto" if name == "auto" else getattr(torch, name)


def load_error(role: str, ref: str | Path, exc: Exception) -> str:
    """Message for a model that could not be loaded, pointing at the offline alternatives."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = (f"from the local directory {str(ref)!r}" if is_local(ref)
             else f"{str(ref)!r}: not a local directory, and as a hub id it could not be loaded "
                  "(hub unreachable, offline, or no such model)")
    return (
        f"cannot load the {role} {where}: {reason}. Pass --{role} PATH to a local checkpoint, or build tiny "
        f"offline models with `dvreward dev tiny-models DIR` and pass --{role} DIR/{role}."
    )


def public_name(ref: str | Path, configured: str | None = None) -> str:
    """The model's name in responses: the configured one, the hub id, or a local directory's own name.
    A local path says where the server keeps its files, which is nobody else's business."""
    if configured:
        return configured
    return Path(ref).expanduser().resolve().name if is_local(ref) else str(ref)


def _checkpoint_dir(ref: str | Path) -> Path | None:
    if is_local(ref):
        return Path(ref).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(ref), local_files_only=True,
                                      allow_patterns=["config.json", "*.safetensors.index.json"]))
    except (ImportError, OSError, ValueError):  # not in the local cache: no digest (public_id says only the name)
        return None


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a .safetensors file: every tensor's name, dtype, shape and byte range."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(min(n, 100 * 2**20))


def checkpoint_digest(ref: str | Path) -> str | None:
    """sha256 of the checkpoint's config and weights index (or, unsharded, its weights header), for
    reproducibility: the same name with other weights or settings gets another digest. None when the
    files cannot be found."""
    root = _checkpoint_dir(ref)
    if root is None or not (root / "config.json").is_file():
        return None
    h = hashlib.sha256()
    config = json.loads((root / "config.json").read_text())
    config.pop("_name_or_path", None)  # where it was loaded from, not what it is
    h.update(json.dumps(config, sort_keys=True).encode())
    indexes = sorted(root.glob("*.safetensors.index.json"))
    for part in indexes or sorted(root.glob("*.safetensors")):
        h.update(part.name.encode())
        h.update(part.read_bytes() if part in indexes else _safetensors_header(part))
    return h.hexdigest()


def public_id(ref: str | Path, configured: str | None = None) -> str:
    """`name@sha256:<12 hex>` (just the name when the checkpoint's files are not at hand)."""
    digest = checkpoint_digest(ref)
    name = public_name(ref, configured)
    return f"{name}@sha256:{digest[:12]}" if digest else name
