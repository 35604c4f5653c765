"""Idempotency keys: a retried request is answered from the first attempt's result, never re-scored.

Built on the broker's single-flight, so a retry that arrives while the first attempt is still
running waits for it instead of starting a second computation.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable

from pydantic import BaseModel

from server.errors import ErrorCode, ServiceError
from server.queue.base import SingleFlight


async def once(
    broker: SingleFlight, principal: str, route: str, key: str | None, body: Callable[[], str], ttl: float,
    deadline: float, run: Callable[[], Awaitable[BaseModel]],
) -> tuple[dict, bool]:
    """(response JSON, replayed). Without a key, just runs. `body` gives the digest of the request's logical body
    (the same whichever form it came in: server.api.parts), and runs in a thread only when a key asks for it.

    Records are scoped by principal (API key): one client's key never meets another client's record.
    """
    if key is None:
        return (await run()).model_dump(mode="json"), False
    if not 1 <= len(key) <= 200:
        raise ServiceError(ErrorCode.bad_request, "Idempotency-Key must be 1 to 200 characters")
    digest = await asyncio.to_thread(body)

    async def compute() -> bytes:
        resp = (await run()).model_dump(mode="json")
        return json.dumps({"body": digest, "response": resp}).encode()

    skey = "idem:" + hashlib.sha256(f"{principal}\n{route}\n{key}".encode()).hexdigest()
    raw, replayed = await broker.singleflight(skey, compute, ttl, deadline)
    stored = json.loads(raw)
    if stored["body"] != digest:
        raise ServiceError(ErrorCode.bad_request, "this Idempotency-Key was already used with a different body")
    return stored["response"], replayed
