"""Splitting a step into requests: whole groups up to a unit budget, then by encoded bytes.

Pure planning (no I/O), so the rules are tested on their own and both clients share them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    """Units [start, stop) of one group (score: images of a group; verify: items of the one pseudo-group)."""

    group: int
    start: int
    stop: int


def plan_chunks(sizes: Sequence[int], max_units: int) -> list[list[Part]]:
    """Pack groups in order into chunks of at most max_units; a group is split only if it alone exceeds max_units."""
    if max_units < 1:
        raise ValueError(f"chunk_images must be >= 1, got {max_units}")
    chunks: list[list[Part]] = []
    cur: list[Part] = []
    n = 0
    for g, size in enumerate(sizes):
        start = 0
        while start < size:
            left = size - start
            if n and (n == max_units or (left > max_units - n and left <= max_units)):
                chunks.append(cur)  # full, or this group fits whole into a fresh chunk: do not split it
                cur, n = [], 0
            take = min(max_units - n, left)
            cur.append(Part(g, start, start + take))
            n += take
            start += take
    if cur:
        chunks.append(cur)
    return chunks


def split_by_bytes(parts: Sequence[Part], size: Callable[[int, int], int], limit: int) -> list[list[Part]]:
    """Cut a planned chunk further so no request body exceeds `limit` bytes (one unit always goes alone)."""
    out: list[list[Part]] = []
    cur: list[Part] = []
    total = 0
    for p in parts:
        start = p.start
        for i in range(p.start, p.stop):
            b = size(p.group, i)
            if total and total + b > limit:
                if i > start:
                    cur.append(Part(p.group, start, i))
                out.append(cur)
                cur, total, start = [], 0, i
            total += b
        if p.stop > start:
            cur.append(Part(p.group, start, p.stop))
    if cur:
        out.append(cur)
    return out

