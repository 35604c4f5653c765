"""The multipart/form-data form of /v1/score and /v1/verify against real servers: it scores what JSON scores,
malformed multipart is a 422 naming what is wrong, retries replay, limits hold (test_bad_inputs sends each of its bad
inputs in this form too, and expects the JSON form's errors).

Bodies are written by httpx's own multipart encoder (`files=`), not by the trainer client's, so the server's parser
is checked against an implementation it does not share.
"""

from __future__ import annotations

import json
import math
import socket
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.test_bad_inputs import JSON, Q, assert_refused, multipart
from tests.service_stack import drop_service_settings
from tests.tolerance import assert_advantages_close, assert_p_close, assert_rewards_close

pytestmark = pytest.mark.float_sensitive  # the two forms' rewards and advantages are compared

Kwargs = dict[str, Any]


@pytest.fixture(scope="module")
def client(embedded_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=embedded_server, timeout=60) as c:
        yield c


# ---- the same answers as JSON ------------------------------------------------------------------------------------
def test_score_in_multipart_is_what_json_scores(client: httpx.Client, kit: types.SimpleNamespace) -> None:
    """Editing groups share one source part (named twice); they are one GRPO group as in JSON, where the source is
    sent twice."""
    source = kit.png_bytes(9)
    images = [kit.png_bytes(i) for i in range(4)]
    qs = kit.explicit_questions()
    as_json = {"groups": [
        {"prompt": "a cat", "questions": qs, "images": [kit.b64(images[0]), kit.b64(images[1])]},
        {"prompt": "make it red", "questions": qs, "images": [kit.b64(images[2])], "source": kit.b64(source)},
        {"prompt": "make it red", "questions": qs, "images": [kit.b64(images[3])], "source": kit.b64(source)},
    ]}
    form = {"groups": [
        {"prompt": "a cat", "questions": qs, "images": ["part:a", kit.b64(images[1])]},  # inline base64 mixes in
        {"prompt": "make it red", "questions": qs, "images": ["part:c"], "source": "part:src"},
        {"prompt": "make it red", "questions": qs, "images": ["part:d"], "source": "part:src"},
    ]}
    want = client.post("/v1/score", json=as_json)
    got = client.post("/v1/score", **multipart(form, [("a", images[0]), ("src", source), ("c", images[2]),
                                                      ("d", images[3])]))
    assert want.status_code == got.status_code == 200, got.text
    w, g = want.json()["groups"], got.json()["groups"]
    rewards = [x["rewards"] for x in g]
    assert all(r is not None for rs in rewards for r in rs)
    assert_rewards_close(rewards, [x["rewards"] for x in w])
    assert_advantages_close([x["advantages"] for x in g], [x["advantages"] for x in w], rewards)
    a, b = g[1]["advantages"][0], g[2]["advantages"][0]
    assert a != 0 and math.isclose(a, -b, rel_tol=1e-9), "one GRPO group (a lone image's would be 0): one source"
    for gx, wx in zip(g, w, strict=True):
        for a, b in zip(gx["images"], wx["images"], strict=True):
            assert_p_close(list(a["p"].values()), list(b["p"].values()))


def test_verify_in_multipart_is_what_json_verifies(client: httpx.Client, kit: types.SimpleNamespace) -> None:
    images = [kit.png_bytes(i) for i in (3, 4, 5)]
    questions = ["Is it red?", "Is there a cat?"]
    want = client.post("/v1/verify", json={"items": [{"images": [kit.b64(images[0])], "questions": questions},
                                                     {"images": [kit.b64(images[1]), kit.b64(images[2])],
                                                      "questions": questions}]})
    got = client.post("/v1/verify", **multipart(
        {"items": [{"images": ["part:0"], "questions": questions},
                   {"images": ["part:1", "part:2"], "questions": questions}]},
        [("0", images[0]), ("1", images[1]), ("2", images[2])]))
    assert want.status_code == got.status_code == 200, got.text
    for a, b in zip(got.json()["results"], want.json()["results"], strict=True):
        assert a["error"] is None and a["p_source"] == b["p_source"]
        assert_p_close(a["p"], b["p"])


def _score_body(*images: str) -> dict[str, Any]:
    return {"groups": [{"questions": Q, "images": list(images)}]}


BOUNDARY = "b0undary"


def _raw(body: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}") -> Kwargs:
    return {"content": body, "headers": {"content-type": content_type}}


def _part(name: str, data: bytes, head: str = "") -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n{head}\r\n').encode() + data + b"\r\n"


MALFORMED: list[tuple[str, Callable[[types.SimpleNamespace], Kwargs], list[str]]] = [
    ("no-boundary", lambda k: _raw(b"x", "multipart/form-data"), ["body", "boundary parameter"]),
    ("boundary-never-occurs", lambda k: _raw(b"just text"), ["body", "boundary never occurs"]),
    ("cut-short", lambda k: _raw(_part("request", json.dumps(_score_body("part:a")).encode())
                                 + _part("a", k.png_bytes(0))[:-40]), ["body", "'a'", "not closed"]),
    ("no-disposition", lambda k: _raw(f"--{BOUNDARY}\r\nContent-Type: {JSON}\r\n\r\n{{}}\r\n--{BOUNDARY}--"
                                      .encode()), ["body", "part 0", "Content-Disposition"]),
    ("first-part-not-the-json", lambda k: {"files": [("a", (None, k.png_bytes(0), "image/png")),
                                                     ("request", (None, b"{}", JSON))]},
     ["body", "first part", "'request'", "'a'"]),
    ("json-part-of-another-type", lambda k: {"files": [("request", (None, b"{}", "text/csv"))]},
     ["body", "'request'", "application/json", "text/csv"]),
    ("two-parts-one-name", lambda k: multipart(_score_body("part:a"), [("a", k.png_bytes(0)),
                                                                      ("a", k.png_bytes(1))]),
     ["body", "two parts", "'a'"]),
    ("a-part-no-image-names", lambda k: multipart(_score_body("part:a"), [("a", k.png_bytes(0)),
                                                                         ("b", k.png_bytes(1))]),
     ["body", "no image names part 'b'", "part:b"]),
]


@pytest.mark.parametrize(("make", "needles"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_multipart_is_a_422_that_says_what_is_wrong(
    client: httpx.Client, kit: types.SimpleNamespace, make: Callable[[types.SimpleNamespace], Kwargs],
    needles: list[str],
) -> None:
    assert_refused(client.post("/v1/score", **make(kit)), 422, "bad_request", needles)


def test_a_preamble_an_epilogue_and_padding_after_a_boundary_are_read(
    client: httpx.Client, kit: types.SimpleNamespace,
) -> None:
    """RFC 2046 allows them; no header but the disposition is needed (a JSON part without a type is JSON)."""
    body = (b"a preamble, ignored\r\n" + _part("request", json.dumps(_score_body("part:a")).encode())
            + f"--{BOUNDARY} \t\r\nContent-Disposition: form-data; name=a\r\n\r\n".encode() + kit.png_bytes(0)
            + f"\r\n--{BOUNDARY}--\r\nan epilogue, ignored".encode())
    r = client.post("/v1/score", **_raw(body))
    assert r.status_code == 200, r.text
    assert r.json()["groups"][0]["rewards"][0] is not None


def test_a_part_name_the_body_lacks_fails_that_image_alone(client: httpx.Client, kit: types.SimpleNamespace) -> None:
    r = client.post("/v1/score", **multipart(_score_body("part:a", "part:nope"), [("a", kit.png_bytes(0))]))
    assert r.status_code == 200, r.text
    (group,) = r.json()["groups"]
    assert group["rewards"][0] is not None and group["rewards"][1] is None
    assert group["errors"][1]["code"] == "bad_image" and "groups[0].images[1]" in group["errors"][1]["message"]
    assert "'nope'" in group["errors"][1]["message"]


def test_only_score_and_verify_take_multipart(client: httpx.Client, kit: types.SimpleNamespace) -> None:
    r = client.post("/v1/decompose", **multipart({"prompts": ["a cat"]}))
    assert_refused(r, 415, "unsupported_media_type", ["application/json", "multipart/form-data"])
    assert r.headers["Accept-Post"] == JSON
    r = client.post("/v1/score", content=b"x", headers={"content-type": "text/plain"})
    assert_refused(r, 415, "unsupported_media_type", ["or multipart/form-data"])
    assert r.headers["Accept-Post"] == f"{JSON}, multipart/form-data"
    assert client.get("/healthz").status_code == 200


# ---- idempotency: the logical request, whatever its form ----------------------------------------------------------
def test_a_retry_replays_in_either_form_and_another_body_is_refused(
    client: httpx.Client, kit: types.SimpleNamespace,
) -> None:
    images = [kit.png_bytes(11), kit.png_bytes(12)]
    form = multipart(_score_body("part:x", "part:y"), [("x", images[0]), ("y", images[1])],
                     **{"Idempotency-Key": "multipart-1"})
    first = client.post("/v1/score", **form)
    retry = client.post("/v1/score", **form)
    # other part names and another boundary, the same logical request; then the JSON form of it
    renamed = client.post("/v1/score", **multipart(_score_body("part:1", "part:0"),
                                                    [("0", images[1]), ("1", images[0])],
                                                    **{"Idempotency-Key": "multipart-1"}))
    as_json = client.post("/v1/score", json=_score_body(kit.b64(images[0]), kit.b64(images[1])),
                          headers={"Idempotency-Key": "multipart-1"})
    other = client.post("/v1/score", **multipart(_score_body("part:x", "part:y"), [("x", images[0]),
                                                                                  ("y", kit.png_bytes(13))],
                                                  **{"Idempotency-Key": "multipart-1"}))
    assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers, first.text
    for r in (retry, renamed, as_json):
        assert r.status_code == 200 and r.headers.get("Idempotent-Replayed") == "true", r.text
        assert r.json() == first.json(), "answered from the first attempt, not scored again"
    assert_refused(other, 422, "bad_request", ["Idempotency-Key", "different body"])


# ---- limits: a small server -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(kit: types.SimpleNamespace, tiny_models: dict[str, Path], tiny_verifier: Any) -> Iterator[str]:
    """Images up to 3,000 bytes in bodies up to 60,000, and a server without the multipart form."""
    from server.runtime import build_app
    from server.settings import Settings

    with pytest.MonkeyPatch.context() as mp:
        drop_service_settings(mp)
        s = Settings(verifier=str(tiny_models["verifier"]), decomposer="", max_image_bytes=3_000,
                     max_body_bytes=60_000)
    with kit.serve_in_thread(build_app(s, (tiny_verifier, None))) as url:
        yield url


def test_an_oversized_part_fails_alone(small: str, kit: types.SimpleNamespace) -> None:
    big = kit.png_bytes(1, (48, 48))
    assert len(big) > 3_000
    r = httpx.post(small + "/v1/score", timeout=60,
                   **multipart(_score_body("part:big", "part:ok"), [("big", big), ("ok", kit.png_bytes(2, (16, 16)))]))
    assert r.status_code == 200, r.text
    (group,) = r.json()["groups"]
    assert group["rewards"][0] is None and group["rewards"][1] is not None
    assert group["errors"][0]["code"] == "too_large"
    assert f"groups[0].images[0]: image is {len(big)} bytes, the limit is 3000" == group["errors"][0]["message"]


def test_an_oversized_multipart_body_is_refused_before_it_is_read(small: str) -> None:
    """Declared too long: the 413 comes from the headers alone (the body is never sent); streamed without a length:
    the 413 comes once the limit is passed."""
    host, port = small.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(f"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}"
                  "\r\nContent-Length: 50000000\r\n\r\n".encode())
        head = s.recv(65536)
        took = time.monotonic() - t0
    assert head.startswith(b"HTTP/1.1 413") and b"60000 bytes" in head and took < 5, (head[:300], took)

    def stream() -> Iterator[bytes]:
        yield _part("request", json.dumps(_score_body("part:a")).encode())
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="a"\r\n\r\n'.encode()
        for _ in range(100):
            yield b"x" * 1000

    r = httpx.post(small + "/v1/score", content=stream(), timeout=30,
                   headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert_refused(r, 413, "too_large", ["request body exceeds the limit of 60000 bytes"])


def test_the_document_describes_the_multipart_form(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    for path, model in (("/v1/score", "ScoreRequest"), ("/v1/verify", "VerifyRequest")):
        content = doc["paths"][path]["post"]["requestBody"]["content"]
        assert content[JSON]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        form = content["multipart/form-data"]
        assert form["schema"]["properties"]["request"] == {"$ref": f"#/components/schemas/{model}"}
        assert form["encoding"]["request"]["contentType"] == JSON
    assert "multipart/form-data" not in doc["paths"]["/v1/decompose"]["post"]["requestBody"]["content"]
    assert "part:NAME" in doc["components"]["schemas"]["ScoreGroup"]["properties"]["images"]["description"]
    assert "Accept-Post" in doc["paths"]["/v1/models"]["get"]["responses"]["200"]["headers"]
    assert client.get("/v1/models").headers["Accept-Post"] == f"{JSON}, multipart/form-data"


def test_with_the_multipart_form_off_the_server_is_json_only(
    kit: types.SimpleNamespace, tiny_models: dict[str, Path], tiny_verifier: Any,
) -> None:
    from server.runtime import build_app
    from server.settings import Settings

    with pytest.MonkeyPatch.context() as mp:
        drop_service_settings(mp)
        s = Settings(verifier=str(tiny_models["verifier"]), decomposer="", multipart_requests=False)
    with kit.serve_in_thread(build_app(s, (tiny_verifier, None))) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert "Accept-Post" not in c.get("/v1/models").headers, "as servers before the form: nothing advertised"
        r = c.post("/v1/score", **multipart(_score_body("part:a"), [("a", kit.png_bytes(0))]))
        assert_refused(r, 415, "unsupported_media_type", ["must be JSON", "multipart/form-data"])
        assert r.headers["Accept-Post"] == JSON
        doc = c.get("/openapi.json").json()
        for path in ("/v1/score", "/v1/verify"):
            assert set(doc["paths"][path]["post"]["requestBody"]["content"]) == {JSON}
        assert c.post("/v1/score", json=_score_body(kit.png_b64(0))).status_code == 200
