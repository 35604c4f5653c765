"""A request's images wherever they travel: base64 inside the JSON, or multipart parts the JSON names `part:NAME`.

One place turns an image string into bytes, with the same per-image checks in both forms, and one place digests the
logical request for idempotency: each image counts by the SHA-256 of its bytes, so the same request sent as JSON or as
multipart has one digest, and a retry replays whichever form it comes in.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Mapping

from dvreward_protocol.schemas import PART_REF, ScoreRequest, VerifyRequest
from server.errors import ErrorCode, ServiceError
from server.images import check_size, decode_base64


class Parts:
    """A multipart body's image parts by name; remembers which ones the JSON has named."""

    def __init__(self, parts: Mapping[str, memoryview]) -> None:
        self.parts = parts
        self.named: set[str] = set()

    def find(self, text: str) -> memoryview | None:
        """The part `part:NAME` names, or None for a string that names none (base64, or a missing part)."""
        return self.parts.get(text[len(PART_REF):]) if text.startswith(PART_REF) else None

    def take(self, text: str) -> memoryview | None:
        """As `find`, and the part counts as named."""
        part = self.find(text)
        if part is not None:
            self.named.add(text[len(PART_REF):])
        return part

    def check_all_named(self) -> None:
        """A part no image names is a request assembled wrong (a typo in a name, say): refused, not ignored."""
        left = [name for name in self.parts if name not in self.named]
        if left:
            raise ServiceError(ErrorCode.bad_request, f"body: no image names part {left[0]!r} ({len(left)} parts "
                               f"unnamed); an image names a part as \"{PART_REF}{left[0]}\"")


def image_bytes(field: str, text: str, parts: Parts | None, max_bytes: int) -> bytes:
    """One image's bytes, from its part or its base64; a ServiceError fails this image only."""
    part = parts.take(text) if parts is not None else None
    if part is not None:
        check_size(part, field, max_bytes)  # before the copy: an oversized part is never copied
        return bytes(part)
    if parts is not None and text.startswith(PART_REF):
        raise ServiceError(ErrorCode.bad_image, f"{field}: names part {text[len(PART_REF):]!r}, which the body does "
                           "not have")
    return decode_base64(text, field, max_bytes)


def with_images(req: ScoreRequest | VerifyRequest, image: Callable[[str], str]) -> ScoreRequest | VerifyRequest:
    """The request with each image string (sources too) replaced by `image(it)`."""
    if isinstance(req, ScoreRequest):
        return req.model_copy(update={"groups": [g.model_copy(update={
            "images": [image(t) for t in g.images], "source": None if g.source is None else image(g.source)})
            for g in req.groups]})
    return req.model_copy(update={"items": [it.model_copy(update={"images": [image(t) for t in it.images]})
                                            for it in req.items]})


def digest(req: ScoreRequest | VerifyRequest, parts: Parts | None, read: Mapping[str, bytes]) -> str:
    """SHA-256 of the request with each image as the SHA-256 of its bytes (by its text where it has none). `read`:
    the bytes the request's checks already decoded, by image text; only the others are looked up here."""
    def image(text: str) -> str:
        data: bytes | memoryview | None = read.get(text)
        if data is None and parts is not None:
            data = parts.find(text)
        if data is None:
            try:
                data = decode_base64(text, "image", sys.maxsize)
            except ServiceError:
                return "text:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        return "sha256:" + hashlib.sha256(data).hexdigest()

    return hashlib.sha256(with_images(req, image).model_dump_json().encode()).hexdigest()
