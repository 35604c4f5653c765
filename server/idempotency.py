"""Idempotency keys: a retried request is answered from the first attempt's result, never re-scored.

The route asks once, before any work: the store's atomic join says whether this key's response is kept (a
`Replay`), or this attempt computes it (a `Record`, which keeps it), and a retry that arrives while the first
attempt is still running waits for it instead of starting a second computation. A record holds what a replay needs
and no more: the digest of the request body and the response without what the request itself holds (each group's
metadata, which a response echoes: a retry carries the same body, as the digest proves, and gets it back from
there). Records are bounded in bytes: a response whose record would pass `Keeping.max_bytes` is answered but not
kept (its record keeps only the digest and says so), and a retry with its key is scored again, rather than the API
or Redis holding tens of megabytes per key for the TTL.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from dvreward_protocol.schemas import ScoreRequest
from server.errors import ErrorCode, ServiceError
from server.queue.base import Lease, OnceStore

log = logging.getLogger("dvreward.api")


@dataclass(frozen=True)
class Keeping:
    """How records are kept: for `ttl` seconds, and only up to `max_bytes` each."""

    ttl: float
    max_bytes: int


@dataclass(frozen=True)
class Replay:
    """The first attempt's response (JSON), for a retry."""

    response: dict[str, Any]


class Record:
    """This attempt computes the response: entered around the computation, which `keep` ends. Leaving it without
    `keep` (the computation failed) tells the retries waiting for it why."""

    def __init__(self, lease: Lease | None, body: str, route: str, keeping: Keeping) -> None:
        self.lease, self.body, self.route, self.keeping = lease, body, route, keeping

    async def __aenter__(self) -> Record:
        if self.lease is not None:
            await self.lease.__aenter__()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self.lease is not None:
            await self.lease.__aexit__(kind, exc, tb)

    async def keep(self, response: BaseModel) -> None:
        if self.lease is None:
            return
        record = json.dumps({"body": self.body, "response": _without_echoes(response.model_dump(mode="json"))}).encode()
        if len(record) > self.keeping.max_bytes:
            log.warning("a %s response of %d bytes is not kept for Idempotency-Key replays (DVREWARD_IDEMPOTENCY_MAX_"
                        "BYTES is %d): a retry with its key is scored again", self.route, len(record),
                        self.keeping.max_bytes)
            record = json.dumps({"body": self.body, "not_kept": len(record)}).encode()
        await self.lease.publish(record, self.keeping.ttl)


class Idempotency:
    def __init__(self, store: OnceStore, keeping: Keeping, timeout_s: float) -> None:
        """`timeout_s`: how long a retry waits for a first attempt still running (the request timeout)."""
        self.store, self.keeping, self.timeout_s = store, keeping, timeout_s

    async def claim(self, principal: str, route: str, key: str | None, request: BaseModel,
                    digest: Callable[[], str]) -> Replay | Record:
        """Without a key, a record that keeps nothing. `digest` gives the digest of the request's logical body (the
        same whichever form it came in: server.api.parts), and runs in a thread only when a key asks for it.

        Records are scoped by principal (API key): one client's key never meets another client's record.
        """
        if key is None:
            return Record(None, "", route, self.keeping)
        if not 1 <= len(key) <= 200:
            raise ServiceError(ErrorCode.bad_request, "Idempotency-Key must be 1 to 200 characters")
        body = await asyncio.to_thread(digest)
        skey = "idem:" + hashlib.sha256(f"{principal}\n{route}\n{key}".encode()).hexdigest()
        got = await self.store.join(skey, time.time() + self.timeout_s)
        if not isinstance(got, bytes):
            return Record(got, body, route, self.keeping)
        stored = json.loads(got)
        if stored["body"] != body:
            raise ServiceError(ErrorCode.bad_request, "this Idempotency-Key was already used with a different body")
        if "not_kept" in stored:  # the first response was too large to keep
            return Record(None, body, route, self.keeping)
        return Replay(_with_echoes(stored["response"], request))


def _without_echoes(resp: dict[str, Any]) -> dict[str, Any]:
    if "groups" not in resp:
        return resp
    return {**resp, "groups": [{k: v for k, v in g.items() if k != "metadata"} for g in resp["groups"]]}


def _with_echoes(resp: dict[str, Any], body: BaseModel) -> dict[str, Any]:
    if isinstance(body, ScoreRequest):
        for group, sent in zip(resp["groups"], body.groups, strict=True):
            group["metadata"] = sent.metadata
    return resp
