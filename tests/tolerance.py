"""The suite's one tolerance for p, rewards and advantages computed two ways.

Two computations of the same (image, question) in float32 differ by float noise: other batch
layouts, thread counts (reduction order), machines and engines move p by ~1e-7 to 1.2e-6
(docs/BENCHMARKS.md). `P_TOL` bounds that with margin; everything else is derived from it:

- reward: the mean of p moves by at most P_TOL; sqrt(SC * PQ) moves by at most
  P_TOL * (SC + PQ) / (2 r) <= P_TOL / r (since SC + PQ <= 2), so |Δr| <= P_TOL * max(1, 1 / r).
  (Hard gating is a step at p = 0.5 and has no such bound: compare it on p, not on rewards.)
- advantage a = (r - mean) / (std + eps): with |Δr| <= d for every reward, |Δmean| <= d and
  |Δstd| <= d (the population std is 1-Lipschitz in the largest change), so
  |Δa| <= (|Δr| + |Δmean| + |a| |Δstd|) / (std + eps) <= (2 + |a|) d / (std + eps).
  A small std makes that large: never compare advantages with a fixed tolerance.

Failed images (None or NaN) must be failed in both.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

P_TOL = 1e-4
# The same float64 rewards summed in another order (means and stds of at most thousands of terms in [0, 1]).
SUM_ORDER = 1e-12


def _failed(x: float | None) -> bool:
    return x is None or math.isnan(x)


def reward_tol(r: float, p_tol: float = P_TOL) -> float:
    return p_tol * max(1.0, 1.0 / r) if r > 0 else math.inf


def _pstd(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def _pairs(got: Sequence[Sequence[float | None]], want: Sequence[Sequence[float | None]],
           what: str) -> Iterator[tuple[int, int, float, float]]:
    assert len(got) == len(want), f"{what}: {len(got)} groups vs {len(want)}"
    for g, (x, y) in enumerate(zip(got, want, strict=True)):
        assert len(x) == len(y), f"{what}: group {g} has {len(x)} values vs {len(y)}"
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            assert _failed(u) == _failed(v), f"{what}[{g}][{i}]: {u} vs {v} (failed in only one)"
            if not _failed(u):
                yield g, i, u, v


def assert_p_close(got: Sequence[float], want: Sequence[float], p_tol: float = P_TOL) -> None:
    """p of the same inputs computed two ways."""
    assert len(got) == len(want), f"{len(got)} p vs {len(want)}"
    worst = max((abs(u - v) for u, v in zip(got, want, strict=True)), default=0.0)
    assert worst <= p_tol, f"p differ by {worst:.3g} > {p_tol:.3g}: {list(got)} vs {list(want)}"


def assert_rewards_close(got: Sequence[Sequence[float | None]], want: Sequence[Sequence[float | None]],
                         p_tol: float = P_TOL) -> None:
    """Per group, per image: the same rewards (or the same failures) up to the noise p carries into them."""
    for g, i, u, v in _pairs(got, want, "rewards"):
        tol = reward_tol(min(u, v), p_tol)
        assert abs(u - v) <= tol, f"rewards[{g}][{i}]: {u} vs {v} differ by {abs(u - v):.3g} > {tol:.3g}"


def advantage_tol(rewards: Sequence[Sequence[float | None]], advantage: float, *, std: str = "global",
                  eps: float = 1e-4, reward_noise: float | None = None, p_tol: float = P_TOL) -> float:
    """(2 + |a|) d / (std + eps) with the smallest std any image's advantage was divided by.

    `reward_noise` (d) defaults to the largest reward tolerance of these rewards. Pooling groups by key
    only adds rewards, and the pooled std is at least the smallest of its groups' (within-group variance
    averages), so the smallest std of a group of two or more valid rewards bounds them all.
    """
    valid = [[r for r in g if not _failed(r)] for g in rewards]
    flat = [r for g in valid for r in g]
    if reward_noise is None:
        reward_noise = max((reward_tol(r, p_tol) for r in flat), default=0.0)
    if std == "global":
        s = _pstd(flat)
    else:
        s = min((_pstd(g) for g in valid if len(g) >= 2), default=0.0)
    return (2 + abs(advantage)) * reward_noise / (s + eps)


def assert_advantages_close(got: Sequence[Sequence[float | None]], want: Sequence[Sequence[float | None]],
                            rewards: Sequence[Sequence[float | None]], *, std: str = "global",
                            eps: float = 1e-4, reward_noise: float | None = None, p_tol: float = P_TOL) -> None:
    """Advantages of rewards that differ by float noise: the tolerance scales with 1 / (std + eps)."""
    for g, i, u, v in _pairs(got, want, "advantages"):
        tol = advantage_tol(rewards, max(abs(u), abs(v)), std=std, eps=eps, reward_noise=reward_noise, p_tol=p_tol)
        assert abs(u - v) <= tol, f"advantages[{g}][{i}]: {u} vs {v} differ by {abs(u - v):.3g} > {tol:.3g}"
