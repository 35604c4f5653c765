"""collect_batch with a scripted fetch function and a scripted clock: no sleeping, no timing."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Callable

import pytest

from server.queue import base
from server.queue.base import collect_batch


class Script:
    """A fetch that returns scripted batches (truncated to n) and advances a fake clock per call."""

    def __init__(self, batches: list[list[int]], cost: float = 0.0) -> None:
        self.batches = list(batches)
        self.cost = cost
        self.now = 100.0
        self.calls: list[tuple[int, float]] = []

    def clock(self) -> float:
        return self.now

    def fetch(self) -> Callable[[int, float], Awaitable[list[int]]]:
        async def fetch(n: int, timeout: float) -> list[int]:
            self.calls.append((n, timeout))
            self.now += self.cost
            return self.batches.pop(0)[:n] if self.batches else []

        return fetch


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Script]:
    def make(batches: list[list[int]], cost: float = 0.0) -> Script:
        s = Script(batches, cost)
        # Only collect_batch's view of the clock is scripted; the event loop keeps the real one.
        monkeypatch.setattr(base, "time", types.SimpleNamespace(monotonic=s.clock, time=s.clock))
        return s

    return make


async def test_fills_up_to_max_size_and_never_asks_for_more(script: Callable[..., Script]) -> None:
    s = script([[1, 2], [3, 4, 5], [6, 7, 8, 9], [10]])
    batch = await collect_batch(s.fetch(), max_size=6, max_wait=0.5)
    assert batch == [1, 2, 3, 4, 5, 6]
    assert [n for n, _ in s.calls] == [6, 4, 1], "each fetch asks only for what is missing"
    assert s.batches == [[10]], "no fetch once the batch is full"


async def test_stops_at_max_wait_after_the_first_item(script: Callable[..., Script]) -> None:
    s = script([[i] for i in range(100)], cost=0.1)  # one item per fetch, 0.1 s of clock each
    batch = await collect_batch(s.fetch(), max_size=50, max_wait=0.35)
    # The window opens when the first fetch returns (t=0.1) and closes at 0.45: fetches start at
    # 0.1, 0.2, 0.3 and 0.4 (each with what is left), and the clock then reads 0.5.
    assert batch == [0, 1, 2, 3, 4]
    assert s.calls[0] == (50, 0.35), "the first fetch blocks for max_wait"
    timeouts = [t for _, t in s.calls[1:]]
    assert all(0 < t <= 0.35 for t in timeouts)
    assert timeouts == sorted(timeouts, reverse=True), "later fetches only get what is left of the window"


async def test_empty_first_fetch_returns_empty_after_one_call(script: Callable[..., Script]) -> None:
    s = script([[], [1, 2, 3]])
    assert await collect_batch(s.fetch(), max_size=8, max_wait=0.2) == []
    assert s.calls == [(8, 0.2)]


async def test_an_empty_later_fetch_ends_the_batch(script: Callable[..., Script]) -> None:
    s = script([[1, 2], [], [3]])
    assert await collect_batch(s.fetch(), max_size=8, max_wait=1.0) == [1, 2]
    assert len(s.calls) == 2


async def test_a_full_first_fetch_needs_no_second(script: Callable[..., Script]) -> None:
    s = script([[1, 2, 3, 4], [5]])
    assert await collect_batch(s.fetch(), max_size=3, max_wait=1.0) == [1, 2, 3]
    assert len(s.calls) == 1


async def test_a_stop_ends_the_filling_at_once(script: Callable[..., Script]) -> None:
    """A stopping worker takes what it holds: a steady trickle of tasks cannot keep it filling for max_wait."""
    stop = asyncio.Event()
    s = script([[i] for i in range(100)], cost=0.1)
    fetch = s.fetch()

    async def fetch_then_stop(n: int, timeout: float) -> list[int]:
        items = await fetch(n, timeout)
        if len(s.calls) == 3:
            stop.set()
        return items

    assert await collect_batch(fetch_then_stop, max_size=50, max_wait=60.0, stop=stop) == [0, 1, 2]
    assert len(s.calls) == 3
