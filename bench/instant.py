"""A verifier that answers at once, for load tests of the serving layer (API + Redis + worker), never for rewards.

p is a deterministic hash of the decoded pixels and the question, so results stay checkable (the same image
and question always give the same p) while the engine costs nothing. No setting selects it: benchmarks and
tests build it, and `python bench/instant.py` runs a worker on it (the queue from DVREWARD_* settings).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engines.base import EngineError, ItemScores, VerifyItem  # noqa: E402

if TYPE_CHECKING:
    from PIL.Image import Image

MODEL_ID = "instant"


def instant_p(pixels: bytes, question: str) -> float:
    """A p in (0, 1) that only the pixels and the question decide."""
    digest = hashlib.blake2b(pixels + b"\x00" + question.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 1) / (2**64 + 1)


def _thumbnail(image: Image) -> bytes:
    """A 16x16 nearest-neighbour sample of the pixels: distinguishes images at a cost that does not weigh in
    the worker's CPU per image (hashing all of a 512² image would)."""
    from PIL import Image as PIL

    return image.resize((16, 16), PIL.Resampling.NEAREST).tobytes()


class InstantVerifier:
    """The Verifier protocol at no cost: p from a hash, exact by construction."""

    model_id = MODEL_ID
    system_prompt = ""

    def verify(self, items: Sequence[VerifyItem]) -> list[list[float]]:
        return [[instant_p(b"".join(_thumbnail(im) for im in it.images), q) for q in it.questions] for it in items]

    def verify_each(self, items: Sequence[VerifyItem], *, greedy: bool = False) -> list[ItemScores | EngineError]:
        return [ItemScores.exact(p, ["yes" if x > 0.5 else "no" for x in p] if greedy else None)
                for p in self.verify(items)]


def main() -> None:
    """One worker on the instant verifier, draining on SIGTERM like `dvreward worker`."""
    from server.runtime import build_broker, build_worker, running
    from server.settings import Settings

    logging.basicConfig(level=logging.WARNING)
    s = Settings(verifier=MODEL_ID, decomposer="")
    worker = build_worker(s, build_broker(s), InstantVerifier(), None)

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with running(worker):
            await stop.wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
