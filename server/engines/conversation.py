"""The conversation a verifier sees for one (item, question): the method's, shared by every engine.

A system message, then one user message holding the item's images in order (source before result
for editing) and then the question text, nothing else; the generation prompt follows. Engines
differ only in how an image part is written (a placeholder for a local chat template, a data URL
for a remote server).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IMAGE_PART: dict[str, Any] = {"type": "image"}


def verifier_messages(
    system_prompt: str, question: str, image_parts: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Chat messages for one question; an empty system prompt sends no system message."""
    if not image_parts:
        raise ValueError("a verification conversation needs at least one image")
    user = {"role": "user", "content": [*image_parts, {"type": "text", "text": question}]}
    if not system_prompt:
        return [user]
    return [{"role": "system", "content": system_prompt}, user]
