"""Resolving a model reference (local directory or hub id) with errors a user can act on."""

from __future__ import annotations

import os
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
