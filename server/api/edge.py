"""The ASGI edge every request passes before FastAPI sees it, outermost first:

Observe (request id, metrics, the answer to a crash) -> Authenticate (the API key, before any body
byte is read) -> BodyGuard (content type, size, admission and arrival time of the body) -> MultipartBody
(server.api.multipart: the multipart form split into its JSON and its images).

Pure ASGI rather than FastAPI middleware: a body that is about to be refused is never buffered, and
every response, including those written here, carries a request id and is counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import Collection, Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dvreward_protocol.schemas import MULTIPART, ErrorInfo, ErrorResponse
from server.api.admission import Admission, Permit
from server.api.metrics import Metrics
from server.errors import ErrorCode

log = logging.getLogger("dvreward.api")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ANONYMOUS = "anonymous"
BUSY_RETRY_AFTER_S = 1.0  # requests in flight end within seconds (most), or at their deadline


def error_response(status: int, code: ErrorCode | str, message: str, request_id: str | None,
                   retry_after: float | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """The service's error format; the one place an error body is built."""
    body = ErrorResponse(error=ErrorInfo(code=str(code), message=message), request_id=request_id).model_dump()
    out = dict(headers or {})
    if retry_after:
        out["Retry-After"] = str(max(1, round(retry_after)))
    if request_id:
        out["X-Request-Id"] = request_id
    return JSONResponse(body, status_code=status, headers=out)


def request_id(scope: Scope) -> str:
    """The id Observe assigned: the client's X-Request-Id when it is a sane label, else a new one."""
    state = scope.setdefault("state", {})
    if "request_id" not in state:
        given = Headers(scope=scope).get("x-request-id")
        state["request_id"] = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex
    return state["request_id"]


def _route_label(scope: Scope) -> str:
    """The route template (bounded label values), also for requests answered before routing: the API's
    paths have no parameters, so such a request is labelled by its path when that is one of them."""
    route = scope.get("route")
    if route is not None:
        return getattr(route, "path", "unmatched")
    app = scope.get("app")
    paths = app.openapi()["paths"] if app is not None else {}  # FastAPI builds the schema once
    return scope["path"] if scope["path"] in paths else "unmatched"


class Observe:
    """Request id, one count per response by route and status, latency; a crash becomes a logged 500."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        rid = request_id(scope)
        status: int | None = None

        async def sending(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                headers = MutableHeaders(scope=msg)
                if "x-request-id" not in headers:
                    headers["X-Request-Id"] = rid
            await send(msg)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            log.error("unhandled error in %s %s (request %s)", scope["method"], scope["path"], rid, exc_info=exc)
            if status is not None:  # the response had begun: nothing valid can follow it
                raise
            status = 500
            await error_response(500, ErrorCode.internal, f"internal error ({type(exc).__name__}); the server "
                                 "log has the details under this request id", rid)(scope, receive, send)
        finally:
            route = _route_label(scope)
            self.metrics.requests.labels(route, str(status or 500)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


class HeadAsGet:
    """HEAD is answered as GET without the body (RFC 9110), on every GET route: monitors probe /healthz and /metrics
    with HEAD. The server keeps its own scope, which still says HEAD, and sends no body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


class Authenticate:
    """When keys are configured, every request but those to the public routes (probes, metrics and docs by default:
    DVREWARD_PUBLIC_ROUTES) needs `Authorization: Bearer KEY`; checked before the body.

    Keys are compared as bytes, each in constant time and all of them every time. The principal (a
    digest of the key, never the key) scopes what one client may see of another's, e.g. idempotency records.
    """

    def __init__(self, app: ASGIApp, api_keys: Sequence[str], public_routes: Sequence[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.public = [(route.rstrip("/"), route.rstrip("/") + "/") for route in public_routes]

    def _needs_key(self, path: str) -> bool:
        return not any(path == route or path.startswith(under) for route, under in self.public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["principal"] = ANONYMOUS
        if self.keys and self._needs_key(scope["path"]):
            key = self._key(scope)
            if key is None:
                return await error_response(401, ErrorCode.unauthorized, "missing or invalid API key: send "
                                            "`Authorization: Bearer KEY`", request_id(scope),
                                            headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            state["principal"] = "key:" + hashlib.sha256(key).hexdigest()[:16]
        await self.app(scope, receive, send)

    def _key(self, scope: Scope) -> bytes | None:
        raw = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, key = raw.partition(b" ")
        ok = False
        for k in self.keys:  # no early exit: the time taken does not say which key came close
            ok |= hmac.compare_digest(key, k)
        return key if ok and scheme.lower() == b"bearer" else None


def media_type(content_type: str) -> str:
    """`type/subtype` of a Content-Type, without its parameters."""
    return content_type.split(";", 1)[0].strip().lower()


def accept_post(multipart: bool) -> str:
    """The Accept-Post header (the media types a POST may send) of a route that takes JSON, and multipart or not."""
    return f"application/json, {MULTIPART}" if multipart else "application/json"


def _accepted(media: str, multipart: bool) -> bool:
    json = media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
    return json or (multipart and media == MULTIPART)


class BodyGuard:
    """Refuses a body that is not JSON (415; multipart/form-data too where `multipart_paths` take it), over the
    limit (413, with or without Content-Length), more than the API may hold at once (429 with Retry-After, from the
    headers: `Admission`), or not fully received within the timeout (408, connection closed), before the app reads
    any of it. A body without Content-Type is read as JSON."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, admission: Admission,
                 multipart_paths: Collection[str] = ()) -> None:
        self.app, self.max_bytes, self.timeout_s, self.admission = app, max_bytes, timeout_s, admission
        self.multipart_paths = frozenset(multipart_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        rid = request_id(scope)
        content_type = headers.get("content-type")
        has_body = scope["method"] in ("POST", "PUT", "PATCH")
        multipart = scope["path"] in self.multipart_paths
        if has_body and content_type is not None and not _accepted(media_type(content_type), multipart):
            return await error_response(
                415, ErrorCode.unsupported_media_type, "the body must be JSON (Content-Type: application/json)"
                + (f" or {MULTIPART} (images as parts: see /docs)" if multipart else "") + f", got "
                f"{content_type[:100]!r}", rid, headers={"Accept-Post": accept_post(multipart)})(scope, receive, send)
        declared = headers.get("content-length")
        size = int(declared) if declared is not None and declared.isdigit() else 0
        if size > self.max_bytes:
            return await self._too_large(scope, receive, send, rid)
        if not has_body:
            return await self._buffered(scope, receive, send, rid, None)
        if content_type is None:  # FastAPI parses no body without one; curl and plain clients send none
            scope["headers"] = [*scope["headers"], (b"content-type", b"application/json")]
        busy = self.admission.full(size)
        if busy is not None:
            return await self._busy(scope, receive, send, rid, busy)
        permit = self.admission.take(size)
        try:
            await self._buffered(scope, receive, send, rid, permit)
        finally:
            self.admission.give_back(permit)

    async def _buffered(self, scope: Scope, receive: Receive, send: Send, rid: str, permit: Permit | None) -> None:
        """Read the body up to the limit before the app sees it: an error raised while FastAPI reads the body would
        become its generic 400."""
        buffered: list[Message] = []
        seen = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    msg = await receive()
                    buffered.append(msg)
                    if msg["type"] != "http.request":
                        break
                    seen += len(msg.get("body", b""))
                    if seen > self.max_bytes:
                        return await self._too_large(scope, receive, send, rid)
                    busy = self.admission.grow(permit, seen) if permit is not None else None
                    if busy is not None:
                        return await self._busy(scope, receive, send, rid, busy)
                    if not msg.get("more_body", False):
                        break
        except TimeoutError:
            return await error_response(
                408, ErrorCode.body_timeout, f"the request body did not arrive within {self.timeout_s:g} s "
                f"({seen} bytes received)", rid, headers={"Connection": "close"})(scope, receive, send)
        replay = iter(buffered)

        async def replayed() -> Message:
            msg = next(replay, None)
            return msg if msg is not None else await receive()

        await self.app(scope, replayed, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        await error_response(413, ErrorCode.too_large, f"request body exceeds the limit of {self.max_bytes} bytes",
                             rid, headers={"Connection": "close"})(scope, receive, send)

    async def _busy(self, scope: Scope, receive: Receive, send: Send, rid: str, why: str) -> None:
        """The connection closes: the unread body cannot be told from a next request."""
        await error_response(429, ErrorCode.rate_limited, f"the API is at capacity: {why}; retry shortly", rid,
                             retry_after=BUSY_RETRY_AFTER_S, headers={"Connection": "close"})(scope, receive, send)
