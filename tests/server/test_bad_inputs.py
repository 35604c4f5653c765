"""Bad requests against the running embedded server: each gets a 4xx with a JSON error naming the field, in the
JSON form and (on /v1/score and /v1/verify) in the multipart form alike.

The server (see EMBEDDED_LIMITS in conftest) allows 6 images, 6 questions per group, 4 groups,
300-character prompts, 1,000,000-pixel images and 200,000-byte bodies.
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import json
import struct
import types
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

Kwargs = dict[str, Any]


def png_header_only(width: int, height: int) -> bytes:
    """A structurally valid PNG whose header claims width x height but carries almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def zeros_png(side: int) -> bytes:
    """A real, fully decodable PNG of side x side black pixels: a few KB on the wire, megapixels decoded."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side), dtype=np.uint8)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def thin_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "GIF")
    return buf.getvalue()


Q = [{"id": "a", "text": "Is there a cat?", "tag": "Existence"}]


def score(k: types.SimpleNamespace, images: list[str] | None = None, **group: Any) -> Kwargs:
    group.setdefault("questions", Q)
    return {"json": {"groups": [{"images": images if images is not None else [k.png_b64(0)], **group}]}}


def raw(content: bytes | Iterator[bytes]) -> Kwargs:
    return {"content": content, "headers": {"content-type": "application/json"}}


def py_json(body: Any, **headers: str) -> Kwargs:
    """JSON as Python's json writes it: lone surrogates as \\ud800 escapes, NaN as NaN (httpx refuses both)."""
    return {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json", **headers}}


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _chunks(total: int) -> Iterator[bytes]:
    yield b'{"groups": [{"prompt": "'
    for _ in range(total // 10_000):
        yield b"x" * 10_000
    yield b'"}]}'


# (id, path, request kwargs from the kit, status, error code, substrings of the message)
CASES: list[tuple[str, str, Callable[[types.SimpleNamespace], Kwargs], int, str, list[str]]] = [
    ("too-many-images", "/v1/score", lambda k: score(k, [k.png_b64(i) for i in range(7)]), 413, "too_large",
     ["images", "7", "limit is 6"]),
    ("too-many-questions", "/v1/score",
     lambda k: score(k, questions=[{"id": f"q{i}", "text": f"Is there {i}?", "tag": "Count"} for i in range(7)]),
     413, "too_large", ["groups[0].questions", "limit is 6"]),
    ("too-many-groups", "/v1/score",
     lambda k: {"json": {"groups": [{"questions": Q, "images": [k.png_b64(0)]}] * 5}}, 413, "too_large",
     ["groups", "limit is 4"]),
    ("empty-prompt-no-questions", "/v1/score", lambda k: score(k, prompt="", questions=None), 422, "bad_request",
     ["groups[0]", "prompt"]),
    ("blank-prompt-no-questions", "/v1/score", lambda k: score(k, prompt="   ", questions=None), 422,
     "bad_request", ["groups[0]", "prompt"]),
    ("empty-question-list", "/v1/score", lambda k: score(k, questions=[]), 422, "bad_request",
     ["groups[0].questions", "at least one question"]),
    ("oversized-prompt", "/v1/score", lambda k: score(k, prompt="a" * 301, questions=None), 413, "too_large",
     ["groups[0].prompt", "301", "300"]),
    ("images-as-int", "/v1/score", lambda k: score(k, 3), 422, "bad_request", ["groups.0.images", "list"]),
    ("images-empty-list", "/v1/score", lambda k: score(k, []), 422, "bad_request", ["groups.0.images"]),
    ("groups-as-dict", "/v1/score", lambda k: {"json": {"groups": {"images": [k.png_b64(0)]}}}, 422,
     "bad_request", ["groups", "list"]),
    ("groups-empty", "/v1/score", lambda k: {"json": {"groups": []}}, 422, "bad_request", ["groups"]),
    ("unknown-field", "/v1/score", lambda k: score(k, colour="red"), 422, "bad_request",
     ["groups.0.colour", "Extra inputs"]),
    ("question-unknown-tag", "/v1/score",
     lambda k: score(k, questions=[{"id": "a", "text": "Is there a cat?", "tag": "Smell"}]), 422, "bad_request",
     ["groups.0.questions.0", "Smell"]),
    ("quality-question-semantic-tag", "/v1/score",
     lambda k: score(k, questions=[{"id": "a", "text": "Sharp?", "kind": "quality", "tag": "Count"}]), 422,
     "bad_request", ["groups.0.questions.0", "quality"]),
    ("dependency-cycle", "/v1/score", lambda k: score(k, questions=[
        {"id": "a", "text": "Is there a cat?", "tag": "Existence", "depends_on": ["b"]},
        {"id": "b", "text": "Is the cat red?", "tag": "Attribute", "depends_on": ["a"]}]), 422, "bad_request",
     ["groups[0].questions", "cycle"]),
    ("unknown-parent", "/v1/score", lambda k: score(k, questions=[
        {"id": "a", "text": "Is the cat red?", "tag": "Attribute", "depends_on": ["zz"]}]), 422, "bad_request",
     ["groups[0].questions", "zz"]),
    ("duplicate-question-ids", "/v1/score", lambda k: score(k, questions=[
        {"id": "a", "text": "Is there a cat?", "tag": "Existence"},
        {"id": "a", "text": "Is there a dog?", "tag": "Existence"}]), 422, "bad_request",
     ["groups[0].questions", "duplicate question id"]),
    ("negative-tag-weight", "/v1/score", lambda k: {"json": {**score(k)["json"], "tag_weights": {"Count": -1}}},
     422, "bad_request", ["tag_weights"]),
    ("unknown-tag-weight", "/v1/score", lambda k: {"json": {**score(k)["json"], "tag_weights": {"existence": 2}}},
     422, "bad_request", ["tag_weights['existence']", "Existence"]),
    ("bad-aggregation", "/v1/score", lambda k: {"json": {**score(k)["json"], "aggregation": "median"}}, 422,
     "bad_request", ["aggregation"]),
    ("zero-clip", "/v1/score", lambda k: {"json": {**score(k)["json"], "advantages": {"clip": 0}}}, 422,
     "bad_request", ["advantages.clip"]),
    ("missing-body", "/v1/score", lambda k: {}, 422, "bad_request", ["body", "required"]),
    ("invalid-json", "/v1/score", lambda k: raw(b'{"groups": [{"images": ['), 422, "bad_request",
     ["body", "invalid JSON"]),
    ("json-not-an-object", "/v1/score", lambda k: raw(b"[1, 2]"), 422, "bad_request", ["body"]),
    ("body-over-limit", "/v1/score", lambda k: raw(b'{"x": "' + b"a" * 200_001 + b'"}'), 413, "too_large",
     ["request body", "200000"]),
    ("chunked-body-over-limit", "/v1/score", lambda k: raw(_chunks(250_000)), 413, "too_large",
     ["request body", "200000"]),
    ("idempotency-key-too-long", "/v1/score", lambda k: {**score(k), "headers": {"Idempotency-Key": "k" * 201}},
     422, "bad_request", ["Idempotency-Key"]),
    # found by fuzzing: each of these was a 500 (or a model error, or poisoned the worker's batch) before
    ("score-prompt-unpaired-surrogate", "/v1/score", lambda k: py_json(score(k, prompt="a cat \ud800")["json"]),
     422, "bad_request", ["groups.0.prompt", "unpaired surrogate"]),
    ("decompose-prompt-unpaired-surrogate", "/v1/decompose", lambda k: py_json({"prompts": ["a cat \ud800"]}), 422,
     "bad_request", ["prompts.0", "unpaired surrogate"]),
    ("verify-question-unpaired-surrogate", "/v1/verify",
     lambda k: py_json({"items": [{"images": [k.png_b64(0)], "questions": ["Is it red? \udc00"]}]}), 422,
     "bad_request", ["items.0.questions.0", "unpaired surrogate"]),
    ("metadata-unpaired-surrogate-with-idempotency-key", "/v1/score",
     lambda k: py_json(score(k, metadata={"step": "\ud800"})["json"], **{"Idempotency-Key": "surrogate"}), 422,
     "bad_request", ["groups.0.metadata", "['step']", "unpaired surrogate"]),
    ("metadata-nested-300-deep", "/v1/score", lambda k: score(k, metadata={"x": nested(300)}), 422, "bad_request",
     ["groups.0.metadata", "32 levels"]),
    ("question-metadata-nested-300-deep", "/v1/score",
     lambda k: score(k, questions=[{**Q[0], "metadata": {"x": nested(300)}}]), 422, "bad_request",
     ["groups.0.questions.0.metadata", "32 levels"]),
    ("metadata-nan", "/v1/score", lambda k: py_json(score(k, metadata={"x": float("nan")})["json"]), 422,
     "bad_request", ["groups.0.metadata", "['x']", "not a JSON number"]),
    ("zero-tag-weight-for-every-question", "/v1/score",
     lambda k: {"json": {**score(k)["json"], "tag_weights": {"Existence": 0}}}, 422, "bad_request",
     ["groups[0]", "sum to zero"]),
    ("body-not-utf8", "/v1/score", lambda k: raw(b'{"groups": "\xff\xfe"}'), 422, "bad_request",
     ["body", "invalid JSON", "UTF-8"]),
    ("body-nested-5000-deep", "/v1/score", lambda k: raw(b"[" * 5000 + b"]" * 5000), 422, "bad_request",
     ["body", "invalid JSON", "nested too deeply"]),
    ("body-integer-of-5000-digits", "/v1/score", lambda k: raw(b'{"groups": [], "x": 1' + b"0" * 5000 + b"}"), 422,
     "bad_request", ["body", "invalid JSON", "digits"]),
    ("verify-empty-question", "/v1/verify",
     lambda k: {"json": {"items": [{"images": [k.png_b64(0)], "questions": ["Is it red?", "  "]}]}}, 422,
     "bad_request", ["items[0].questions[1]", "empty"]),
    ("verify-no-questions", "/v1/verify", lambda k: {"json": {"items": [{"images": [k.png_b64(0)], "questions": []}]}},
     422, "bad_request", ["items.0.questions"]),
    ("verify-three-images-in-one-item", "/v1/verify",  # one item is one sequence: 64 images took 2.3 GB
     lambda k: {"json": {"items": [{"images": [k.png_b64(0)] * 3, "questions": ["Is it red?"]}]}}, 413, "too_large",
     ["items[0].images", "3 images", "limit is 2"]),
    ("decompose-empty-prompt", "/v1/decompose", lambda k: {"json": {"prompts": ["a cat", " "]}}, 422,
     "bad_request", ["prompts[1]", "empty"]),
    ("decompose-oversized-prompt", "/v1/decompose", lambda k: {"json": {"prompts": ["b" * 301]}}, 413,
     "too_large", ["prompts[0]", "300"]),
    ("decompose-prompts-not-strings", "/v1/decompose", lambda k: {"json": {"prompts": [1]}}, 422, "bad_request",
     ["prompts.0"]),
]


# An image that cannot be scored fails alone: the request is a 200, that image is null with its code and reason,
# and the rest are scored. (id, path, images of group 0 / item 0 as made by the kit, index of the bad one, code,
# substrings of its message)
PER_IMAGE: list[tuple[str, str, Callable[[types.SimpleNamespace], list[str]], int, str, list[str]]] = [
    ("corrupt-base64", "/v1/score", lambda k: [k.png_b64(1), "@@not base64!!"], 1, "bad_image",
     ["groups[0].images[1]", "base64"]),
    ("not-an-image", "/v1/score", lambda k: [k.png_b64(0), k.b64(b"hello")], 1, "bad_image",
     ["groups[0].images[1]", "not a readable"]),
    ("gif-not-accepted", "/v1/score", lambda k: [k.b64(gif_bytes()), k.png_b64(1)], 0, "bad_image",
     ["groups[0].images[0]", "PNG, JPEG, WEBP"]),
    ("bomb-header-100000x100000", "/v1/score", lambda k: [k.b64(png_header_only(100_000, 100_000)), k.png_b64(1)],
     0, "bad_image", ["groups[0].images[0]", "decompression bomb"]),
    ("header-over-pixel-limit", "/v1/score", lambda k: [k.b64(png_header_only(1200, 1200)), k.png_b64(1)], 0,
     "too_large", ["groups[0].images[0]", "1200x1200", "1000000"]),
    ("real-zeros-png-over-pixel-limit", "/v1/score", lambda k: [k.b64(zeros_png(2000)), k.png_b64(1)], 0,
     "too_large", ["groups[0].images[0]", "2000x2000"]),
    ("empty-string", "/v1/score", lambda k: ["", k.png_b64(1)], 0, "bad_image", ["groups[0].images[0]", "non-empty"]),
    ("base64-of-zero-bytes", "/v1/score", lambda k: [k.png_b64(0), k.b64(b"")], 1, "bad_image",
     ["groups[0].images[1]"]),
    ("data-url-of-zero-bytes", "/v1/score", lambda k: ["data:image/png;base64,", k.png_b64(1)], 0, "bad_image",
     ["groups[0].images[0]", "zero bytes"]),
    ("image-aspect-ratio-4000-to-1", "/v1/score", lambda k: [k.png_b64(0), k.b64(thin_png(4000, 1))], 1,
     "bad_image", ["groups[0].images[1]", "4000x1", "200:1"]),
    ("verify-image-aspect-ratio-1-to-250", "/v1/verify", lambda k: [k.b64(thin_png(1, 250))], 0, "bad_image",
     ["items[0].images[0]", "1x250"]),
    ("verify-corrupt-image", "/v1/verify", lambda k: [k.png_b64(0), "%%%"], 0, "bad_image", ["items[0].images[1]"]),
]


def _per_image_request(k: types.SimpleNamespace, path: str, images: list[str]) -> Kwargs:
    """Score: the images in one group, then a good group; verify: the images as one item, then a good item."""
    if path == "/v1/score":
        return {"json": {"groups": [{"questions": Q, "images": images}, {"questions": Q, "images": [k.png_b64(2)]}]}}
    return {"json": {"items": [{"images": images, "questions": ["Is it red?"]},
                               {"images": [k.png_b64(2)], "questions": ["Is it red?"]}]}}


# ---- the same requests in the multipart form (images as parts): the same errors ------------------------------------
JSON = "application/json"


def multipart(body: bytes | dict[str, Any], parts: Sequence[tuple[str, bytes]] = (), **headers: str) -> Kwargs:
    """httpx's multipart/form-data: the JSON body first (named `request`), then the parts in order."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    files = [("request", (None, raw, JSON)), *((name, (None, data, "image/png")) for name, data in parts)]
    return {"files": files, "headers": headers}


def _b64_bytes(text: Any) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True) if isinstance(text, str) and text else None
    except binascii.Error:
        return None


def as_multipart(kwargs: Kwargs) -> Kwargs:
    """The same request as multipart: each image that is base64 in the JSON moves to a part of its own (the rest,
    undecodable on purpose, stays inline: the form allows both)."""
    headers = {k: v for k, v in kwargs.get("headers", {}).items() if k.lower() != "content-type"}
    if "json" not in kwargs:
        return multipart(kwargs.get("content", b""), **headers)
    body = copy.deepcopy(kwargs["json"])
    parts: list[tuple[str, bytes]] = []

    def move(container: Any, key: str | int) -> None:
        data = _b64_bytes(container[key])
        if data is not None:
            parts.append((f"img{len(parts)}", data))
            container[key] = f"part:img{len(parts) - 1}"

    for unit in [*(body.get("groups") or []), *(body.get("items") or [])] if isinstance(body, dict) else []:
        if isinstance(unit, dict) and isinstance(unit.get("images"), list):
            for i in range(len(unit["images"])):
                move(unit["images"], i)
        if isinstance(unit, dict) and unit.get("source") is not None:
            move(unit, "source")
    return multipart(body, parts, **headers)


# Score and verify take multipart; a body streamed without a length is not bytes to put in a part (test_multipart has
# that case).
FORMS = [(*c, "json") for c in CASES] + [(*c, "multipart") for c in CASES
                                         if c[1] != "/v1/decompose" and c[0] != "chunked-body-over-limit"]
PER_IMAGE_FORMS = [(*c, form) for form in ("json", "multipart") for c in PER_IMAGE]


@pytest.fixture(scope="module")
def client(embedded_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=embedded_server, timeout=60) as c:
        yield c


def assert_refused(r: httpx.Response, status: int, code: str, needles: list[str]) -> None:
    """A JSON error of this status and code whose message holds each needle."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"code", "message"}
    assert error["code"] == code, error
    for needle in needles:
        assert needle in error["message"], (needle, error["message"])


def assert_fails_alone(r: httpx.Response, path: str, bad: int, code: str, needles: list[str]) -> None:
    """A 200 to a `_per_image_request` where image `bad` alone failed, with this code and the needles."""
    assert r.status_code == 200, r.text
    body = r.json()
    if path == "/v1/score":
        first, good = body["groups"]
        assert first["rewards"][bad] is None and first["advantages"][bad] is None
        error = first["images"][bad]["error"]
        assert all(x is not None for i, x in enumerate(first["rewards"]) if i != bad), "the others are scored"
        assert good["rewards"][0] is not None
    else:
        first, good = body["results"]
        assert first["p"] is None
        error = first["error"]
        assert good["p"] is not None and good["error"] is None
    assert error["code"] == code, error
    for needle in needles:
        assert needle in error["message"], (needle, error["message"])


@pytest.mark.parametrize(("path", "make", "status", "code", "needles", "form"), [c[1:] for c in FORMS],
                         ids=[f"{c[0]}-{c[-1]}" for c in FORMS])
def test_bad_input_is_refused_with_a_clear_json_error(
    client: httpx.Client, kit: types.SimpleNamespace, path: str, make: Callable[[types.SimpleNamespace], Kwargs],
    status: int, code: str, needles: list[str], form: str,
) -> None:
    """Multipart: the same request with its images as parts (its body the JSON part) gets the JSON form's error."""
    r = client.post(path, **(make(kit) if form == "json" else as_multipart(make(kit))))
    assert_refused(r, status, code, needles)
    if form == "multipart":
        assert r.json()["error"] == client.post(path, **make(kit)).json()["error"], "the same message as JSON"


@pytest.mark.parametrize(("path", "make", "bad", "code", "needles", "form"), [c[1:] for c in PER_IMAGE_FORMS],
                         ids=[f"{c[0]}-{c[-1]}" for c in PER_IMAGE_FORMS])
def test_an_image_that_cannot_be_scored_fails_alone(
    client: httpx.Client, kit: types.SimpleNamespace, path: str, make: Callable[[types.SimpleNamespace], list[str]],
    bad: int, code: str, needles: list[str], form: str,
) -> None:
    """Multipart: each image that is base64 in the JSON form goes as a part, and fails alone as in JSON."""
    kwargs = _per_image_request(kit, path, make(kit))
    r = client.post(path, **(kwargs if form == "json" else as_multipart(kwargs)))
    assert_fails_alone(r, path, bad, code, needles)


def test_an_image_that_fails_to_decode_in_the_worker_is_an_explicit_per_image_error(
    client: httpx.Client, kit: types.SimpleNamespace,
) -> None:
    """The header passes the API's check; the truncated pixel data fails in the worker, for that image only."""
    whole = kit.png_bytes(5, (64, 64))
    truncated = whole[: len(whole) // 2]
    r = client.post("/v1/score", **score(kit, [kit.png_b64(4), kit.b64(truncated), kit.png_b64(6)]))
    assert r.status_code == 200, r.text
    (group,) = r.json()["groups"]
    assert group["rewards"][1] is None and group["advantages"][1] is None, "a failed image is never a silent 0"
    assert group["rewards"][0] is not None and group["rewards"][2] is not None
    assert abs(group["advantages"][0] + group["advantages"][2]) < 1e-6
    bad = group["images"][1]
    assert bad["reward"] is None and bad["p"] is None
    assert bad["error"]["code"] == "bad_image" and bad["error"]["message"]


def test_server_still_serves_after_the_bad_inputs(client: httpx.Client, kit: types.SimpleNamespace) -> None:
    for _, path, make, *_ in CASES:  # the whole table once more, back to back
        assert 400 <= client.post(path, **make(kit)).status_code < 500
    for _, path, make_images, *_ in PER_IMAGE:
        assert client.post(path, **_per_image_request(kit, path, make_images(kit))).status_code == 200
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    r = client.post("/v1/score", **score(kit, [kit.png_b64(1), kit.png_b64(2)]))
    assert r.status_code == 200, r.text
    assert all(x is not None and 0 < x < 1 for x in r.json()["groups"][0]["rewards"])
