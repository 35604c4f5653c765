"""Which Redis failures mean "the queue cannot serve for now" (503 with Retry-After, retried by workers) rather than a
fault of this code (500).

Mapped by exception class: redis-py strips the code from the text of the errors it has a class for (an
OutOfMemoryError reads "command not allowed when used memory > 'maxmemory'"), and prefixes errors inside a
pipeline with "Command # n (...)", so the text is no guide. The codes redis-py has no class for keep theirs, and
`error_code` reads it.
"""

from __future__ import annotations

from redis.exceptions import (
    BusyLoadingError,
    ExecAbortError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.errors import ErrorCode, ServiceError

RETRY_AFTER_S = 2.0

# Refusals of a server that is up but cannot take commands now: memory full (noeviction), a replica after a
# failover, a transaction aborted by one of them, a dataset still loading, no master.
_REFUSALS: dict[type[Exception], str] = {
    OutOfMemoryError: "is out of memory (maxmemory reached)",
    ReadOnlyError: "is read-only (a replica, e.g. after a failover)",
    ExecAbortError: "aborted a transaction",
    BusyLoadingError: "is loading its dataset",
    MasterDownError: "has lost its master",
    TryAgainError: "asks to try again",
}
# The same, by the codes redis-py has no class for.
_REFUSAL_CODES = {"MISCONF": "cannot persist (MISCONF)", "BUSY": "is busy running a script",
                  "NOREPLICAS": "has too few replicas"}
_PIPELINE_PREFIX = "of pipeline caused error: "


def error_code(exc: ResponseError) -> str:
    """The RESP error code of a reply redis-py raised as a plain ResponseError (NOGROUP, UNBLOCKED, MISCONF, ...),
    read from where redis-py leaves it: its own field when it fills it, else the first word of the server's text."""
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code:
        return code
    text = str(exc)
    return text.rpartition(_PIPELINE_PREFIX)[2].split(" ", 1)[0] if _PIPELINE_PREFIX in text else text.split(" ", 1)[0]


def unavailable(exc: BaseException) -> ServiceError | None:
    """The 503 a Redis failure is, or None when it is not an outage or refusal (a fault to report as such)."""
    for cls, reason in _REFUSALS.items():
        if isinstance(exc, cls):
            return _refused(reason, exc)
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
        return ServiceError(ErrorCode.unavailable, f"the queue (Redis) is unreachable: {exc}",
                            retry_after=RETRY_AFTER_S)
    if isinstance(exc, ResponseError) and error_code(exc) in _REFUSAL_CODES:
        return _refused(_REFUSAL_CODES[error_code(exc)], exc)
    return None


def _refused(reason: str, exc: BaseException) -> ServiceError:
    return ServiceError(ErrorCode.unavailable, f"the queue (Redis) cannot serve requests now: it {reason} ({exc})",
                        retry_after=RETRY_AFTER_S)
