"""Single-flight over Redis: one caller computes, every other caller (of any API replica) waits for its outcome.

Joining is one script: a caller gets the cached value, or takes the lock (the owner), or registers as a waiter,
in one atomic step, so an owner that finishes between two steps can never make a late caller compute again.
The lock is short (DVREWARD_LOCK_TTL_S) and renewed by its owner while it computes, so the lock of an API that
died mid-computation lapses within that TTL; waiters join again at every pause in their wait, which takes
the lapsed lock over (or finds the value), instead of waiting out their deadline for an owner that is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from redis.exceptions import RedisError

from server.errors import ErrorCode, ServiceError
from server.queue.base import lease_error, remaining
from server.queue.keys import Keys

log = logging.getLogger("dvreward.queue")

HIT, OWNER, WAITER = 1, 2, 3

# KEYS: value, lock, waiters. ARGV: caller (its message list's key), lock ttl ms, waiters ttl ms.
_JOIN = """
local v = redis.call('GET', KEYS[1])
if v then
  redis.call('SREM', KEYS[3], ARGV[1])
  return {1, v}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('SREM', KEYS[3], ARGV[1])
  return {2, ''}
end
redis.call('SADD', KEYS[3], ARGV[1])
if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[3], ARGV[3]) end
return {3, ''}
"""

# KEYS: lock. ARGV: owner, lock ttl ms. Extends the lock only while this owner holds it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: value, waiters, lock. ARGV: message, value-or-empty, value ttl s, message ttl s, owner.
# A value is cached and reaches every waiter. A failure reaches them unless another caller has taken the lock over
# (they will hear that caller's outcome). Only the owner releases the lock.
_PUBLISH = """
local holder = redis.call('GET', KEYS[3])
if ARGV[2] == '' and holder and holder ~= ARGV[5] then return 0 end
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
for _, w in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  redis.call('RPUSH', w, ARGV[1])
  redis.call('EXPIRE', w, ARGV[4])
end
redis.call('DEL', KEYS[2])
if holder == ARGV[5] then redis.call('DEL', KEYS[3]) end
return 1
"""


class RedisOnceStore:
    def __init__(self, redis: Any, keys: Keys, *, lock_ttl: float, block_s: float) -> None:
        """`lock_ttl`: how long a lock outlives its owner's last renewal; `block_s`: the longest blocking read."""
        self.redis = redis
        self.keys = keys
        self.lock_ms = int(lock_ttl * 1000)
        self.renew_s = lock_ttl / 3  # two renewals may fail (a slow Redis) before the lock lapses
        self.recheck_s = min(block_s, lock_ttl / 2)  # a waiter finds a lapsed lock within this of its lapse
        self._join = redis.register_script(_JOIN)
        self._renew = redis.register_script(_RENEW)
        self._publish = redis.register_script(_PUBLISH)

    async def join(self, key: str, deadline: float) -> bytes | _RedisLease:
        k = self.keys
        me = k.waiter(uuid.uuid4().hex)
        msg_ttl = int(max(1.0, remaining(deadline))) + 5
        while True:
            state, hit = await self._join(keys=[k.value(key), k.lock(key), k.waiters(key)],
                                          args=[me, self.lock_ms, msg_ttl * 1000])
            if state == HIT:
                return hit
            if state == OWNER:
                return _RedisLease(self, key, me, msg_ttl)
            left = remaining(deadline)
            if left <= 0:
                raise ServiceError(ErrorCode.timeout, "a concurrent identical computation did not finish in time")
            item = await self.redis.blpop([me], timeout=max(0.01, min(left, self.recheck_s)))
            if item is not None:
                await self.redis.delete(me)
                return _value(item[1])


class _RedisLease:
    """Renewed while entered; publishing (or leaving without a value) reaches every waiter and releases the lock."""

    def __init__(self, store: RedisOnceStore, key: str, me: str, msg_ttl: int) -> None:
        self.store, self.me, self.msg_ttl = store, me, msg_ttl
        k = store.keys
        self.script_keys = [k.value(key), k.waiters(key), k.lock(key)]
        self.published = False
        self._renewer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _RedisLease:
        self._renewer = asyncio.create_task(self._keep())
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if not self.published:  # failed or cancelled: every waiter hears, and the lock is released
            await asyncio.shield(self._send([_message(None, lease_error(exc)), "", 1, self.msg_ttl, self.me]))

    async def publish(self, value: bytes, ttl: float) -> None:
        await asyncio.shield(self._send([_message(value, None), value, int(ttl), self.msg_ttl, self.me]))
        self.published = True

    async def _send(self, args: list[Any]) -> None:
        await self.store._publish(keys=self.script_keys, args=args)

    async def _keep(self) -> None:
        """Renew the lock while computing. A renewal Redis refuses is tried again at the next period; a lock found
        lost (Redis flushed or restarted, or renewals failed for a whole TTL) is not taken back: a waiter may hold it
        now, and publishing reaches whoever still waits."""
        lock = self.script_keys[2]
        while True:
            await asyncio.sleep(self.store.renew_s)
            try:
                if not await self.store._renew(keys=[lock], args=[self.me, self.store.lock_ms]):
                    log.warning("the single-flight lock %s lapsed while its computation ran", lock)
                    return
            except (RedisError, OSError) as exc:
                log.warning("renewing the single-flight lock %s failed (%s); retrying", lock, exc)


def _message(value: bytes | None, error: ServiceError | None) -> bytes:
    """What a waiter receives: the value, or the error that ended the computation (JSON, never pickle)."""
    if error is not None:
        return json.dumps({"ok": False, "code": error.code.value, "message": error.message}).encode()
    assert value is not None
    return json.dumps({"ok": True, "value": value.decode()}).encode()


def _value(raw: bytes) -> bytes:
    msg = json.loads(raw)
    if not msg["ok"]:
        raise ServiceError(ErrorCode(msg["code"]), msg["message"])
    return msg["value"].encode()
