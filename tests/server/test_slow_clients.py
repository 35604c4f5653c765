"""Slow clients against a real `dvreward api` process: heads and bodies that trickle in (or never come)
get 408 and a closed connection within DVREWARD_BODY_TIMEOUT_S, and the server keeps serving."""

from __future__ import annotations

import asyncio
import time
import types
from collections.abc import Callable
from typing import Any

import httpx
import pytest

TIMEOUT_S = 1.0
HOST = "127.0.0.1"


@pytest.fixture
def api(services: Callable[..., Any], redis_url: str, kit: types.SimpleNamespace) -> Any:
    proc = services("api", "api", kit.service_env(redis_url=redis_url, body_timeout_s=TIMEOUT_S), http=True)
    proc.wait_http("/healthz")
    return proc


async def trickle(port: int, first: bytes, then: bytes, every: float, limit: float) -> tuple[bytes, float]:
    """Send `first`, then one byte of `then` every `every` seconds; return what came back and when."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(first)
    got = b""

    async def read() -> None:
        nonlocal got
        while chunk := await reader.read(65536):
            got += chunk

    reading = asyncio.create_task(read())
    try:
        for byte in then:
            done, _ = await asyncio.wait({reading}, timeout=every)
            if done or time.monotonic() - t0 > limit:
                break
            writer.write(bytes([byte]))
        await asyncio.wait_for(reading, timeout=max(0.1, limit - (time.monotonic() - t0)))
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
    return got, time.monotonic() - t0


HEAD = b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def test_slow_heads_and_bodies_get_408_and_are_closed(api: Any) -> None:
    async def main() -> list[tuple[bytes, float]]:
        body_slow = [trickle(api.port, HEAD + b"Content-Length: 1000\r\n\r\n{", b"x" * 1000, 0.2, 8)
                     for _ in range(20)]
        head_slow = [trickle(api.port, b"POST /v1/sc", b"ore HTTP/1.1\r\nHost: x\r\n" * 10, 0.2, 8)
                     for _ in range(10)]
        silent = [trickle(api.port, b"", b"", 0.2, 8) for _ in range(5)]
        return await asyncio.gather(*body_slow, *head_slow, *silent)

    results = asyncio.run(main())
    for got, took in results:
        assert got.startswith(b"HTTP/1.1 408"), got[:200]
        assert b"body_timeout" in got and b"connection: close" in got.lower()
        assert took < TIMEOUT_S + 3, f"held for {took:.1f} s"
    assert httpx.get(api.url + "/healthz", timeout=5).status_code == 200
    assert api.alive()
