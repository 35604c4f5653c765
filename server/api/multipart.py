"""The multipart/form-data form of /v1/score and /v1/verify (RFC 7578): the JSON body and the images as parts.

Runs inside BodyGuard, so the body it splits is already bounded, admitted and complete. The first part, `request`,
goes on to FastAPI as the body itself: it gets the JSON form's validation and error messages by construction. The
image parts wait in the request's state, as views of the body (an oversized one is never copied), until the request's
checks resolve the `part:NAME` strings that name them (server.api.parts). Malformed multipart is a 422 naming what is
wrong; no third-party parser is needed for a body that is already in memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dvreward_protocol.schemas import MULTIPART, REQUEST_PART
from server.api.edge import error_response, media_type, request_id
from server.errors import ErrorCode

MAX_HEAD = 2048  # bytes of one part's header lines; a client's are ~100
_BOUNDARY = re.compile(r';\s*boundary=(?:"([^"]*)"|([^\s;"]*))', re.I)
_BCHARS = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")  # RFC 2046 5.1.1
_NAME = re.compile(r';\s*name=(?:"([^"]*)"|([^\s;"]+))', re.I)


class MultipartError(ValueError):
    """What makes a body unreadable as multipart/form-data, said to the client."""


@dataclass(frozen=True)
class Part:
    name: str
    content_type: str | None
    data: memoryview


def boundary(content_type: str) -> bytes:
    m = _BOUNDARY.search(content_type)
    value = (m.group(1) if m.group(1) is not None else m.group(2)) if m else ""
    if not _BCHARS.fullmatch(value):
        raise MultipartError(f"{MULTIPART} needs a boundary parameter of 1 to 70 characters (RFC 2046), got "
                             f"{content_type[:120]!r}")
    return value.encode("ascii")


def _head(raw: bytes, index: int) -> tuple[str, str | None]:
    """A part's name and content type from its header lines."""
    try:
        lines = raw.decode("utf-8").split("\r\n") if raw else []
    except UnicodeDecodeError as exc:
        raise MultipartError(f"part {index}: headers are not UTF-8 ({exc})") from None
    fields: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if not sep:
            raise MultipartError(f"part {index}: {line[:80]!r} is not a header line")
        fields[key.strip().lower()] = value.strip()
    disposition = fields.get("content-disposition", "")
    name = _NAME.search(disposition)
    if disposition.split(";", 1)[0].strip().lower() != "form-data" or name is None:
        raise MultipartError(f"part {index}: needs `Content-Disposition: form-data; name=\"...\"`, got "
                             f"{disposition[:80]!r}")
    return name.group(1) if name.group(1) is not None else name.group(2), fields.get("content-type")


def split(body: bytes, delimiter: bytes) -> list[Part]:
    """The parts between `--delimiter` lines (a preamble and an epilogue are ignored, as RFC 2046 says)."""
    dash, view = b"--" + delimiter, memoryview(body)
    between = b"\r\n" + dash
    if body.startswith(dash):
        pos = len(dash)
    else:  # after a preamble
        pos = body.find(between)
        if pos < 0:
            raise MultipartError("the boundary never occurs in the body")
        pos += len(between)
    parts: list[Part] = []
    while body[pos:pos + 2] != b"--":
        eol = body.find(b"\r\n", pos, pos + 80)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise MultipartError(f"part {len(parts)}: the boundary line does not end (is the body cut short?)")
        end_head = body.find(b"\r\n\r\n", eol, eol + MAX_HEAD)
        if end_head < 0:
            raise MultipartError(f"part {len(parts)}: no blank line ends its headers within {MAX_HEAD} bytes")
        name, content_type = _head(body[eol + 2:end_head], len(parts))
        end = body.find(between, end_head + 4)
        if end < 0:
            raise MultipartError(f"part {len(parts)} ({name!r}) is not closed by the boundary (is the body cut "
                                 "short?)")
        parts.append(Part(name, content_type, view[end_head + 4:end]))
        pos = end + len(between)
    return parts


def parse(body: bytes, content_type: str) -> tuple[bytes, dict[str, memoryview]]:
    """The JSON part's bytes and the other parts by name."""
    parts = split(body, boundary(content_type))
    if not parts or parts[0].name != REQUEST_PART:
        raise MultipartError(f"the first part must be the JSON body, named {REQUEST_PART!r}, got "
                             f"{parts[0].name if parts else 'no part'!r}")
    json_type = parts[0].content_type
    if json_type is not None and media_type(json_type) != "application/json":
        raise MultipartError(f"part {REQUEST_PART!r} must be application/json, got {json_type[:100]!r}")
    images: dict[str, memoryview] = {}
    for p in parts[1:]:
        if p.name in images or p.name == REQUEST_PART:
            raise MultipartError(f"two parts are named {p.name!r}")
        images[p.name] = p.data
    return bytes(parts[0].data), images


class MultipartBody:
    """Hands the app a multipart body's JSON part as the body, with its image parts in `scope["state"]["parts"]`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = Headers(scope=scope).get("content-type") if scope["type"] == "http" else None
        if content_type is None or media_type(content_type) != MULTIPART:
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client left: nobody to answer
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        try:
            body, parts = parse(b"".join(chunks), content_type)
        except MultipartError as exc:
            return await error_response(422, ErrorCode.bad_request, f"body: {exc}", request_id(scope))(
                scope, receive, send)
        scope.setdefault("state", {})["parts"] = parts
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        first: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def replayed() -> Message:
            return first.pop() if first else await receive()

        await self.app({**scope, "headers": headers}, replayed, send)
