"""The reference's reflection round as pure helpers: which stage-1 image each prompt refines, the feedback text
an image gets, and the rewards of the refinements after false positive rectification.

The round: stage-1 images are scored; per prompt one image is chosen (the lowest reward, or sampled with
probabilities softmax((1 - r) / temperature)); its refinements are scored against the same questions; a
refinement whose reward does not beat its starting image's gets the lowest starting reward of its group;
a step where nothing improved trains nothing (the reference skips it).
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

from dvreward_protocol.grpo import (
    DEFAULT_CLIP,
    DEFAULT_EPS,
    DEFAULT_STD,
    StdMode,
    false_positive_rectification,
    group_advantages,
    is_scored,
)

Selection = Literal["lowest", "softmax"]
# Our wording; a trainer's reflection prompt may take it as is, or pass its own template with {failed}.
FEEDBACK_TEMPLATE = "Not yet right: {failed}"


def select_for_refinement(rewards: Sequence[Sequence[float | None]], mode: Selection = "lowest",
                          temperature: float = 1.0, rng: random.Random | None = None) -> list[int | None]:
    """Per group, the index of the image to refine (None when none of its images was scored).

    "lowest": the lowest reward (the first on ties), the reference's default. "softmax": sampled with
    probabilities softmax((1 - r) / temperature), the reference's option (its temperature is 1).
    """
    if mode not in ("lowest", "softmax"):
        raise ValueError(f"mode must be 'lowest' or 'softmax', got {mode!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    rng = rng or random.Random()
    out: list[int | None] = []
    for group in rewards:
        scored = [(i, r) for i, r in enumerate(group) if is_scored(r)]
        if not scored:
            out.append(None)
        elif mode == "lowest":
            out.append(min(scored, key=lambda x: (x[1], x[0]))[0])
        else:
            top = max((1 - r) / temperature for _, r in scored)
            weights = [math.exp((1 - r) / temperature - top) for _, r in scored]
            out.append(rng.choices([i for i, _ in scored], weights=weights)[0])
    return out


def feedback(failed: Sequence[str], template: str = FEEDBACK_TEMPLATE, separator: str = "; ") -> str:
    """The questions an image failed, in order, for the trainer's reflection prompt ("" when it failed none)."""
    return template.format(failed=separator.join(q.strip() for q in failed)) if failed else ""


@dataclass(frozen=True)
class Rectified:
    """Refined images' rewards after false positive rectification, with their GRPO advantages."""

    rewards: list[list[float | None]]
    improved: list[list[bool]]  # the refinement's own reward beat its starting image's
    advantages: list[list[float | None]]

    @property
    def any_improved(self) -> bool:
        """False: no refinement of the step improved on its start; the reference skips such a step."""
        return any(i for g in self.improved for i in g)


def rectify(refined: Sequence[Sequence[float | None]], start: Sequence[Sequence[float | None]],
            keys: Sequence[Hashable | None] | None = None, std: StdMode = DEFAULT_STD, eps: float = DEFAULT_EPS,
            clip: float | None = DEFAULT_CLIP) -> Rectified:
    """`refined[g][i]` refines an image whose reward was `start[g][i]`; failed images (None / NaN) stay failed."""
    rewards = false_positive_rectification(refined, start)
    improved = [[is_scored(r) and is_scored(s) and r > s for r, s in zip(rg, sg, strict=True)]
                for rg, sg in zip(refined, start, strict=True)]
    return Rectified(rewards, improved, group_advantages(rewards, std=std, eps=eps, clip=clip, keys=keys))
