"""GRPO helpers shared by the trainer client and the server (pure Python, no numpy).

A failed image (None reward, or NaN as `on_error="nan"` returns it) is left out of every statistic
and gets the same marker as its advantage: it must never be treated as a reward of 0.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Sequence
from typing import Literal, TypeGuard

from dvreward_protocol.schemas import Warning

StdMode = Literal["group", "global"]

# The reference's advantages: population std over the whole step, +1e-4, clipped to ±5.
DEFAULT_STD: StdMode = "global"
DEFAULT_EPS = 1e-4
DEFAULT_CLIP = 5.0


def group_key(prompt: str | None, source: str | bytes | None = None) -> Hashable | None:
    """What makes images one GRPO group: their prompt (as the reference keys groups), and for editing also the
    source image they were edited from (its encoded bytes, or a text that stands for them). None: a group of its
    own."""
    if prompt is None:
        return None
    if source is None:
        return prompt
    return prompt, hashlib.sha256(source if isinstance(source, bytes) else source.encode()).hexdigest()


def is_scored(r: float | None) -> TypeGuard[float]:
    """A reward that exists: not None (failed on the wire) and not NaN (failed, as on_error="nan" returns it)."""
    return r is not None and not math.isnan(r)


def _std(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def group_advantages(
    rewards: Sequence[Sequence[float | None]],
    std: StdMode = DEFAULT_STD,
    eps: float = DEFAULT_EPS,
    clip: float | None = DEFAULT_CLIP,
    keys: Sequence[Hashable | None] | None = None,
) -> list[list[float | None]]:
    """(r - group mean) / (std + eps), std per group or over the whole step (population), optionally clipped.

    `keys` (one per group, e.g. the prompt) pools groups with the same non-None key into one GRPO group,
    as the reference keys groups by prompt; groups without a key stand alone. A group whose valid
    rewards are all equal gets zero advantages (never NaN).
    """
    if std not in ("group", "global"):
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be positive, got {clip}")
    if keys is not None and len(keys) != len(rewards):
        raise ValueError(f"{len(keys)} keys for {len(rewards)} groups")
    for g in rewards:
        for r in g:
            if is_scored(r) and not math.isfinite(r):
                raise ValueError(f"reward {r} is not finite; pass None or NaN for a failed image")
    pooled = _pooled(rewards, keys)
    global_std = _std([r for g in rewards for r in g if is_scored(r)])  # each image once, pooled or not
    out: list[list[float | None]] = []
    for g, vg in zip(rewards, pooled, strict=True):
        mean = sum(vg) / len(vg) if vg else 0.0
        s = _std(vg) if std == "group" else global_std
        adv: list[float | None] = []
        for r in g:
            if not is_scored(r):
                adv.append(r)  # None stays None, NaN stays NaN
                continue
            a = 0.0 if max(vg) == min(vg) else (r - mean) / (s + eps)
            if clip is not None:
                a = max(-clip, min(clip, a))
            adv.append(a)
        out.append(adv)
    return out


def _pooled(rewards: Sequence[Sequence[float | None]], keys: Sequence[Hashable | None] | None) -> list[list[float]]:
    """Per group, the valid rewards of its GRPO group: its own, or all groups' with the same key."""
    valid = [[r for r in g if is_scored(r)] for g in rewards]
    if keys is None:
        return valid
    by_key: dict[Hashable, list[float]] = {}
    for k, vg in zip(keys, valid, strict=True):
        if k is not None:
            by_key.setdefault(k, []).extend(vg)
    return [vg if k is None else by_key[k] for k, vg in zip(keys, valid, strict=True)]


def neutral_rewards(
    rewards: Sequence[Sequence[float | None]], keys: Sequence[Hashable | None] | None = None,
) -> list[list[float]]:
    """Failed images (None or NaN) given the mean of their GRPO group's scored rewards, so their advantage is 0.

    A trainer's tensors take no None and one NaN turns a batch's std into NaN; 0 would train against the
    image. The group mean is neutral: the sample contributes no gradient. A GRPO group (pooled by key, as
    `group_advantages` pools) with no scored image gets one constant, the mean of the step's scored rewards.
    Raises ValueError when nothing in the step was scored: no value can stand in then.
    """
    if keys is not None and len(keys) != len(rewards):
        raise ValueError(f"{len(keys)} keys for {len(rewards)} groups")
    scored = [r for g in rewards for r in g if is_scored(r)]
    if not scored:
        raise ValueError("no image of the step was scored: there is no reward to stand in for the failed ones")
    step_mean = sum(scored) / len(scored)
    return [[r if is_scored(r) else (sum(vg) / len(vg) if vg else step_mean) for r in g]
            for g, vg in zip(rewards, _pooled(rewards, keys), strict=True)]


def lone_groups(rewards: Sequence[Sequence[float | None]], keys: Sequence[Hashable | None] | None = None) -> list[int]:
    """Groups whose GRPO group (pooled by key) has exactly one valid reward: advantage 0, nothing to learn."""
    return [g for g, (own, vg) in enumerate(zip(rewards, _pooled(rewards, keys), strict=True))
            if len(vg) == 1 and any(is_scored(r) for r in own)]


def false_positive_rectification(
    refined: Sequence[Sequence[float | None]],
    start: Sequence[Sequence[float | None]],
) -> list[list[float | None]]:
    """A refined image whose reward is not above its starting image's gets the group's minimum start reward.

    Groups are aligned: refined[g][i] is the refinement of start[g][i].
    """
    if len(refined) != len(start):
        raise ValueError(f"{len(refined)} refined groups but {len(start)} start groups")
    out: list[list[float | None]] = []
    for gi, (rg, sg) in enumerate(zip(refined, start, strict=True)):
        if len(rg) != len(sg):
            raise ValueError(f"group {gi}: {len(rg)} refined images but {len(sg)} start images")
        valid_start = [s for s in sg if is_scored(s)]
        floor = min(valid_start) if valid_start else None
        row: list[float | None] = []
        for r, s in zip(rg, sg, strict=True):
            if not is_scored(r) or not is_scored(s) or floor is None:
                row.append(r)
            else:
                row.append(r if r > s else floor)
        out.append(row)
    return out


def lone_image_warnings(rewards: Sequence[Sequence[float | None]], keys: Sequence[Hashable | None]) -> list[Warning]:
    """One warning per group alone with its prompt; the server's, and a client's that merged a split step."""
    return [Warning(group=g, code="lone_image",
                    message="one scored image for its prompt: its advantage is 0 and it trains nothing")
            for g in lone_groups(rewards, keys)]
