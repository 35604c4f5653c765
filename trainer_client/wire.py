"""How a request's images travel: base64 inside the JSON body, or binary parts of a multipart/form-data body.

The multipart form (see dvreward_protocol.schemas) sends each image's bytes as they are: a third fewer bytes than
base64, and neither base64 nor a JSON string of megabytes to build. A server that takes it lists it in the
Accept-Post header of GET /v1/models; one that does not (older servers) gets JSON. Pure: no I/O.
"""

from __future__ import annotations

import base64
import uuid
from typing import Literal

from pydantic import BaseModel

from dvreward_protocol.schemas import MULTIPART, PART_REF, REQUEST_PART

RequestFormat = Literal["auto", "json", "multipart"]
JSON = "application/json"
OCTETS = "application/octet-stream"


def offers_multipart(accept_post: str | None) -> bool:
    """Whether an Accept-Post header lists the multipart form."""
    return any(t.split(";", 1)[0].strip().lower() == MULTIPART for t in (accept_post or "").split(","))


def wire_size(n: int, multipart: bool) -> int:
    """The bytes an image of `n` bytes adds to a request body in either form."""
    return n + PART_HEAD if multipart else 4 * ((n + 2) // 3)


class Body:
    """One request body: `image()` places each image (inline, or as a part) and returns the string the JSON holds
    for it; `encode()` then writes the body and its Content-Type."""

    def __init__(self, multipart: bool) -> None:
        self.multipart = multipart
        self.parts: list[bytes] = []

    def image(self, data: bytes) -> str:
        if not self.multipart:
            return base64.b64encode(data).decode("ascii")
        self.parts.append(data)
        return f"{PART_REF}{len(self.parts) - 1}"

    def encode(self, request: BaseModel) -> tuple[bytes, str]:
        body = request.model_dump_json().encode()
        if not self.multipart:
            return body, JSON
        # A random 128-bit boundary: the chance that it occurs in the images is nil (RFC 2046 asks that it not).
        boundary = uuid.uuid4().hex
        out = [_head(boundary, REQUEST_PART, JSON), body]
        for i, data in enumerate(self.parts):
            out += [_head(boundary, str(i), OCTETS), data]
        out.append(f"\r\n--{boundary}--\r\n".encode())
        return b"".join(out), f"{MULTIPART}; boundary={boundary}"


def _head(boundary: str, name: str, content_type: str) -> bytes:
    """A part's delimiter (the CRLF before it ends the previous part) and headers."""
    first = "" if name == REQUEST_PART else "\r\n"
    return (f'{first}--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n").encode()


PART_HEAD = len(_head(uuid.uuid4().hex, "999999", OCTETS))  # what a part adds to its image's bytes
