"""The narrow engine interface every backend implements (transformers, vLLM, remote).

Engines are synchronous and import no web stack: workers call them in a thread, and the
benchmarks and the GPU machine import them without FastAPI or Redis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from PIL.Image import Image

    from dvreward_protocol.questions import Decomposition  # pydantic: not needed to run an engine


class EngineError(RuntimeError):
    """A model could not produce a valid result; the message says why."""


@dataclass(frozen=True)
class VerifyItem:
    """One unit of verification: the image(s) shown together and the questions asked of them.

    More than one image serves editing rewards (source image beside the result).
    """

    images: tuple[Image, ...]
    questions: tuple[str, ...]


class Verifier(Protocol):
    model_id: str
    system_prompt: str  # the system message of every conversation it scores, reported with results

    def verify(self, items: Sequence[VerifyItem]) -> list[list[float]]:
        """p = P(yes) / (P(yes) + P(no)) for every question of every item, in order."""
        ...


class Decomposer(Protocol):
    model_id: str
    pipeline: str

    def decompose(self, prompts: Sequence[str]) -> list[Decomposition]:
        """One validated decomposition per prompt, or EngineError saying why not."""
        ...

    def decompose_each(self, prompts: Sequence[str]) -> list[Decomposition | EngineError]:
        """Per prompt, a decomposition or the EngineError that says why not (batched, failures isolated)."""
        ...
