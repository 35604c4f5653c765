"""Idempotency keys: a retried request is answered from the first attempt's result, never re-scored.

Built on the broker's single-flight, so a retry that arrives while the first attempt is still running waits for
it instead of starting a second computation. A record holds what a replay needs and no more: the digest of the
request body and the response without what the request itself holds (each group's metadata, which a response
echoes: a retry carries the same body, as the digest proves, and gets it back from there). Records are bounded in
bytes: a response whose record would pass `Keeping.max_bytes` is answered but not kept (its record keeps only the
digest and says so), and a retry with its key is scored again, rather than the API or Redis holding tens of
megabytes per key for the TTL.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from dvreward_protocol.schemas import ScoreRequest
from server.errors import ErrorCode, ServiceError
from server.queue.base import SingleFlight

log = logging.getLogger("dvreward.api")


@dataclass(frozen=True)
class Keeping:
    """How records are kept: for `ttl` seconds, and only up to `max_bytes` each."""

    ttl: float
    max_bytes: int


async def once(
    broker: SingleFlight, principal: str, route: str, key: str | None, request: BaseModel, digest: Callable[[], str],
    run: Callable[[], Awaitable[BaseModel]], keeping: Keeping, deadline: float,
) -> tuple[dict, bool]:
    """(response JSON, replayed). Without a key, just runs. `digest` gives the digest of the request's logical body
    (the same whichever form it came in: server.api.parts), and runs in a thread only when a key asks for it.

    Records are scoped by principal (API key): one client's key never meets another client's record.
    """
    if key is None:
        return (await run()).model_dump(mode="json"), False
    if not 1 <= len(key) <= 200:
        raise ServiceError(ErrorCode.bad_request, "Idempotency-Key must be 1 to 200 characters")
    body = await asyncio.to_thread(digest)
    fresh: list[dict[str, Any]] = []  # the response, when this call computed it

    async def compute() -> bytes:
        resp = (await run()).model_dump(mode="json")
        fresh.append(resp)
        record = json.dumps({"body": body, "response": _without_echoes(resp)}).encode()
        if len(record) <= keeping.max_bytes:
            return record
        log.warning("a %s response of %d bytes is not kept for Idempotency-Key replays (DVREWARD_IDEMPOTENCY_MAX_BYTES"
                    " is %d): a retry with its key is scored again", route, len(record), keeping.max_bytes)
        return json.dumps({"body": body, "not_kept": len(record)}).encode()

    skey = "idem:" + hashlib.sha256(f"{principal}\n{route}\n{key}".encode()).hexdigest()
    raw, replayed = await broker.singleflight(skey, compute, keeping.ttl, deadline)
    if fresh:
        return fresh[0], False
    stored = json.loads(raw)
    if stored["body"] != body:
        raise ServiceError(ErrorCode.bad_request, "this Idempotency-Key was already used with a different body")
    if "not_kept" in stored:  # the first response was too large to keep
        return (await run()).model_dump(mode="json"), False
    return _with_echoes(stored["response"], request), replayed


def _without_echoes(resp: dict[str, Any]) -> dict[str, Any]:
    if "groups" not in resp:
        return resp
    return {**resp, "groups": [{k: v for k, v in g.items() if k != "metadata"} for g in resp["groups"]]}


def _with_echoes(resp: dict[str, Any], body: BaseModel) -> dict[str, Any]:
    if isinstance(body, ScoreRequest):
        for group, sent in zip(resp["groups"], body.groups, strict=True):
            group["metadata"] = sent.metadata
    return resp
