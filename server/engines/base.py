"""The narrow engine interface every backend implements (transformers, vLLM, remote).

Engines are synchronous and import no web stack: workers call them in a thread, and the
benchmarks and the GPU machine import them without FastAPI or Redis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from dvreward_protocol.answers import PSource  # how a p was read: logits, top_k or text

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


@dataclass(frozen=True)
class ItemScores:
    """p for each question of one item, in order, where each p came from, and (when asked) the greedy answers."""

    p: tuple[float, ...]
    source: tuple[PSource, ...]
    answers: tuple[str, ...] | None = None  # the greedy continuation of each conversation, as text

    @classmethod
    def exact(cls, p: Sequence[float], answers: Sequence[str] | None = None) -> ItemScores:
        """p read from the full next-token distribution."""
        logits: PSource = "logits"
        return cls(tuple(p), (logits,) * len(p), None if answers is None else tuple(answers))


class Verifier(Protocol):
    model_id: str
    system_prompt: str  # the system message of every conversation it scores, reported with results

    def verify(self, items: Sequence[VerifyItem]) -> list[list[float]]:
        """p = P(yes) / (P(yes) + P(no)) for every question of every item, in order; EngineError if any fails."""
        ...

    def verify_each(self, items: Sequence[VerifyItem], *, greedy: bool = False) -> list[ItemScores | EngineError]:
        """Per item, its scores or the EngineError that says why it has none; with `greedy`, also each
        conversation's greedy answer (up to GREEDY_TOKENS tokens), which the binary reward reads.

        An engine may still raise for the whole batch (the caller then retries item by item).
        """
        ...


def scores_or_raise(results: Sequence[ItemScores | EngineError]) -> list[list[float]]:
    """`verify` from `verify_each`: every p, or the first item's error."""
    for n, r in enumerate(results):
        if isinstance(r, EngineError):
            raise EngineError(f"item {n}: {r}")
    return [list(r.p) for r in results if isinstance(r, ItemScores)]


class Decomposer(Protocol):
    model_id: str
    pipeline: str

    def decompose(self, prompts: Sequence[str], *, editing: bool = False) -> list[Decomposition]:
        """One validated decomposition per prompt, or EngineError saying why not."""
        ...

    def decompose_each(self, prompts: Sequence[str], *, editing: bool = False) -> list[Decomposition | EngineError]:
        """Per prompt, a decomposition or the EngineError that says why not (batched, failures isolated).

        `editing`: the prompts are editing instructions, decomposed with the editing template.
        """
        ...
