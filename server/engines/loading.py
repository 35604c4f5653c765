"""Resolving a model reference (local directory or hub id) with errors a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


def is_local(ref: str) -> bool:
    return Path(ref).expanduser().is_dir()


def pretrained_kwargs(ref: str) -> dict[str, Any]:
    """A local directory never touches the network, so a typo cannot turn into a download."""
    return {"local_files_only": True} if is_local(ref) else {}


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return "auto" if name == "auto" else getattr(torch, name)


def load_error(role: str, ref: str, exc: Exception) -> str:
    """Message for a model that could not be loaded, pointing at the offline alternatives."""
    where = "local directory" if is_local(ref) else "hub id (is the hub reachable from here?)"
    return (
        f"could not load the {role} from {where} {ref!r}: {exc}. "
        f"Pass --{role} PATH to a local checkpoint, or create tiny offline models with "
        f"`dvreward dev tiny-models DIR` and pass --{role} DIR/{role}."
    )
