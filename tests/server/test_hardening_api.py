"""Defects adversarial testing found at the API edge, each against a real app on a real uvicorn server.

Auth before the body, idempotency per principal, errors without heap addresses, 405/415/413/408 in the
service's format with a request id, every response counted in /metrics, and server faults that are 5xx.
"""

from __future__ import annotations

import json
import re
import socket
import time
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.engines.base import ItemScores, VerifyItem
from tests.service_stack import drop_service_settings

Q = [{"id": "a", "text": "Is there a cat?", "tag": "Existence"},
     {"id": "b", "text": "Is the cat red?", "tag": "Attribute"}]


class DropsOneP:
    """A verifier whose results are one p short: the kind of server-side fault a broken worker makes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:  # model_id, system_prompt, ...: the real engine's
        return getattr(self.inner, name)

    def verify_each(self, items: Sequence[VerifyItem], greedy: bool = False) -> list[Any]:
        return [ItemScores(r.p[:-1], r.source[:-1]) if isinstance(r, ItemScores) else r
                for r in self.inner.verify_each(items, greedy=greedy)]


@pytest.fixture
def serve(kit: types.SimpleNamespace, tiny_models: dict[str, Path], tiny_verifier: Any,
          monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """serve(verifier=..., **settings): the embedded app with a worker, in a real uvicorn server."""
    from server.runtime import build_app
    from server.settings import Settings

    drop_service_settings(monkeypatch)

    @contextmanager
    def make(verifier: Any = tiny_verifier, **settings: Any) -> Iterator[str]:
        s = Settings(verifier=str(tiny_models["verifier"]), decomposer="", **settings)
        with kit.serve_in_thread(build_app(s, (verifier, None))) as url:
            yield url

    return make


def body(kit: types.SimpleNamespace, seeds: Sequence[int] = (1,), **extra: Any) -> dict[str, Any]:
    return {"groups": [{"questions": Q, "images": [kit.png_b64(s) for s in seeds]}], **extra}


# ---- item 2: a fault after validation is the server's, not the client's -------------------------
def test_a_worker_result_that_cannot_be_aggregated_is_a_5xx_not_the_clients_fault(
    serve: Callable[..., Any], kit: types.SimpleNamespace, tiny_verifier: Any,
) -> None:
    with serve(DropsOneP(tiny_verifier)) as url:
        r = httpx.post(url + "/v1/score", json=body(kit), timeout=60)
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "aggregation_failed", err
    assert "groups[0].images[0]" in err["message"]
    assert r.json()["request_id"] == r.headers["X-Request-Id"]


def test_weights_that_zero_a_half_are_refused_before_any_image_is_verified(
    serve: Callable[..., Any], kit: types.SimpleNamespace, tiny_verifier: Any,
) -> None:
    """Still the client's 422, even with a worker whose results could not be aggregated: nothing was verified."""
    with serve(DropsOneP(tiny_verifier)) as url:
        r = httpx.post(url + "/v1/score", json=body(kit, tag_weights={"Existence": 0, "Attribute": 0}), timeout=60)
        metrics = httpx.get(url + "/metrics").text
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "bad_request" and "groups[0]" in r.json()["error"]["message"]
    assert 'dvreward_images_total{outcome="ok"}' not in metrics


# ---- item 3: an item the verifier's token budget cannot hold is refused before the queue -------------------
def test_items_over_the_token_budget_are_413_before_any_work(
    serve: Callable[..., Any], kit: types.SimpleNamespace,
) -> None:
    """448x448 is 256 visual tokens, plus the template and system prompt: more than a budget of 450 tokens per
    forward pass."""
    big, small = kit.png_b64(1, (448, 448)), kit.png_b64(2, (32, 32))
    with serve(max_batch_tokens=450) as url, httpx.Client(base_url=url, timeout=60) as c:
        verify = c.post("/v1/verify", json={"items": [{"images": [small], "questions": ["Is it red?"]},
                                                      {"images": [big], "questions": ["Is it red?"]}]})
        score = c.post("/v1/score", json={"groups": [{"questions": Q, "images": [small, big]}]})
        fine = c.post("/v1/verify", json={"items": [{"images": [small], "questions": ["Is it red?"]}]})
        metrics = c.get("/metrics").text
    assert verify.status_code == 413, verify.text
    assert "items[1]" in verify.json()["error"]["message"]
    assert "DVREWARD_MAX_BATCH_TOKENS" in verify.json()["error"]["message"]
    assert score.status_code == 413 and "groups[0].images[1]" in score.json()["error"]["message"], score.text
    assert fine.status_code == 200 and fine.json()["results"][0]["p"] is not None, fine.text
    assert re.search(r'dvreward_images_total\{outcome="ok"\} 1\.0', metrics), "only the small item was scored"


def test_non_latin_questions_over_the_token_budget_are_413_up_front(
    serve: Callable[..., Any], kit: types.SimpleNamespace, tiny_models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Characters / 4 let CJK and emoji questions through (about 100 tokens estimated), and the worker, with the same
    budget, counted more than it holds (a token per byte, here) and failed the item after its batch ran: 200 with a
    null reward. Counted by their UTF-8 bytes, they are 413 before any work; a Latin question of as many characters
    still fits."""
    from server.runtime import load_verifier
    from server.settings import Settings

    drop_service_settings(monkeypatch)
    budget = 450
    verifier = load_verifier(Settings(verifier=str(tiny_models["verifier"]), decomposer="", max_batch_tokens=budget))
    image = kit.png_b64(2, (32, 32))
    cjk, emoji, latin = "猫是红色的吗" * 17, "🐱🎨🔴🐶" * 20, "Is the cat red? " * 6
    with serve(verifier, max_batch_tokens=budget) as url, httpx.Client(base_url=url, timeout=60) as c:
        answers = {name: c.post("/v1/verify", json={"items": [{"images": [image], "questions": [q]}]})
                   for name, q in (("cjk", cjk), ("emoji", emoji), ("latin", latin))}
        score = c.post("/v1/score", json={"groups": [{"images": [image], "questions": [
            {"id": "a", "text": emoji, "tag": "Existence"}]}]})
        metrics = c.get("/metrics").text
    for name in ("cjk", "emoji"):
        r = answers[name]
        assert r.status_code == 413, (name, r.text)
        message = r.json()["error"]["message"]
        assert "items[0]" in message and "DVREWARD_MAX_BATCH_TOKENS" in message
    assert score.status_code == 413 and "groups[0].images[0]" in score.json()["error"]["message"], score.text
    latin_result = answers["latin"].json()["results"][0]
    assert answers["latin"].status_code == 200 and latin_result["p"] is not None, latin_result
    assert re.search(r'dvreward_images_total\{outcome="ok"\} 1\.0', metrics), "only the Latin item was scored"


# ---- items 5, 6, 7: keys as bytes, checked before the body, idempotency per key ---------------------
def raw_request(url: str, head: bytes, body: bytes = b"", wait: float = 10.0) -> tuple[bytes, float]:
    """Send raw bytes (headers, part of a body) and read until the server closes or `wait` passes."""
    host, port = url.removeprefix("http://").split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(head + body)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
                if b"\r\n\r\n" in got and b'"request_id"' in got:
                    break
        except TimeoutError:
            pass
    return got, time.monotonic() - t0


def status_of(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw.split(b" ", 2)[1])


def test_auth_non_ascii_key_is_401_and_keys_are_checked_before_the_body(
    serve: Callable[..., Any], kit: types.SimpleNamespace,
) -> None:
    with serve(api_keys=["k1", "k2"]) as url, httpx.Client(base_url=url, timeout=30) as c:
        for value in ("Bearer é".encode(), b"Bearer \xff\xfe", "Bearer k1é".encode(), b"bearer"):
            r = c.post("/v1/score", json=body(kit), headers={"Authorization": value})
            assert r.status_code == 401, (value, r.text)
            assert r.json()["error"]["code"] == "unauthorized" and r.json()["request_id"]
        r = c.post("/v1/score", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 401, "without a key, the body is not even parsed"
        # A 50 MB body is declared and never sent: the 401 comes at once, nothing is buffered.
        head = (b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 50000000\r\n\r\n")
        raw, took = raw_request(url, head, b'{"groups": [', wait=10)
        assert status_of(raw) == 401 and took < 5, (raw[:300], took)
        assert c.post("/v1/score", json=body(kit), headers={"Authorization": "Bearer k2"}).status_code == 200


def test_idempotency_keys_are_scoped_by_api_key(serve: Callable[..., Any], kit: types.SimpleNamespace) -> None:
    """Another client reusing `step-1` neither gets a 422 nor the first client's response."""
    k1 = {"Authorization": "Bearer k1", "Idempotency-Key": "step-1"}
    k2 = {"Authorization": "Bearer k2", "Idempotency-Key": "step-1"}
    with serve(api_keys=["k1", "k2"]) as url, httpx.Client(base_url=url, timeout=60) as c:
        first = c.post("/v1/score", json=body(kit, [1]), headers=k1)
        other_body = c.post("/v1/score", json=body(kit, [2]), headers=k2)
        k2_retry = c.post("/v1/score", json=body(kit, [2]), headers=k2)
        k1_retry = c.post("/v1/score", json=body(kit, [1]), headers=k1)
        k3 = c.post("/v1/score", json=body(kit, [1]), headers={"Authorization": "Bearer k2", "Idempotency-Key": "s-2"})
    assert first.status_code == other_body.status_code == 200, other_body.text
    assert "Idempotent-Replayed" not in other_body.headers
    assert other_body.json()["request_id"] != first.json()["request_id"]
    for retry, original in ((k1_retry, first), (k2_retry, other_body)):
        assert retry.headers.get("Idempotent-Replayed") == "true"
        assert retry.json()["request_id"] == original.json()["request_id"], "each key replays its own record"
    assert k3.status_code == 200 and k3.json()["request_id"] != first.json()["request_id"]


# ---- item 9: no heap addresses in errors; the Bearer scheme in the OpenAPI document ------------------
def test_errors_carry_no_heap_addresses_and_openapi_declares_bearer(
    serve: Callable[..., Any], kit: types.SimpleNamespace,
) -> None:
    with serve() as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/score", json={"groups": [{"questions": Q, "images": [kit.b64(b"hello, not an image")]}]})
        schema = c.get("/openapi.json").json()
    assert r.status_code == 200, r.text  # the image fails alone
    error = r.json()["groups"][0]["images"][0]["error"]
    assert error["code"] == "bad_image"
    assert not re.search(r"0x[0-9a-fA-F]{4,}", r.text), r.text
    assert "BytesIO" in error["message"] or "not a readable" in error["message"]
    schemes = schema["components"]["securitySchemes"]
    assert any(s["type"] == "http" and s["scheme"].lower() == "bearer" for s in schemes.values()), schemes
    for path in ("/v1/score", "/v1/verify", "/v1/decompose"):
        assert schema["paths"][path]["post"]["security"], path
    assert "security" not in schema["paths"]["/healthz"]["get"]


# ---- item 14: protocol details -----------------------------------------------------------------------
class BrokenSubmit:
    """Fault injection: a broker whose submit has a bug (not an outage); everything else works."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def submit(self, tasks: Any) -> None:
        raise RuntimeError("submit bug")


def test_protocol_errors_have_allow_415_request_ids_and_are_all_counted(
    kit: types.SimpleNamespace, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from server.api.app import create_app
    from server.runtime import build_broker, build_service
    from server.settings import Settings

    drop_service_settings(monkeypatch)
    s = Settings(verifier=str(tiny_models["verifier"]), decomposer="", max_body_bytes=10_000)
    broker = BrokenSubmit(build_broker(s))
    service = build_service(s, broker)  # type: ignore[arg-type]
    rid = {"X-Request-Id": "proto-1"}
    with kit.serve_in_thread(create_app(s, broker, service)) as url, httpx.Client(base_url=url, timeout=30) as c:
        r405 = c.get("/v1/score", headers=rid)
        assert r405.status_code == 405 and r405.headers["Allow"] == "POST", r405.headers
        for ctype, content in (("text/plain", b'{"groups": []}'), ("application/x-www-form-urlencoded", b"a=1")):
            r = c.post("/v1/score", content=content, headers={**rid, "content-type": ctype})
            assert r.status_code == 415, r.text
            assert r.json()["error"]["code"] == "unsupported_media_type" and ctype in r.json()["error"]["message"]
            assert r.json()["request_id"] == "proto-1" == r.headers["X-Request-Id"]
        assert c.post("/v1/score", json={"groups": []}, headers={"content-type": "application/json; charset=utf-8"}
                      ).status_code == 422, "JSON with a charset is JSON"
        r413 = c.post("/v1/score", content=b'{"x": "' + b"a" * 20_000 + b'"}', headers={**rid, "content-type":
                                                                                       "application/json"})
        assert r413.status_code == 413 and r413.json()["request_id"] == "proto-1" == r413.headers["X-Request-Id"]
        r500 = c.post("/v1/score", json=body(kit), headers=rid)
        assert r500.status_code == 500 and r500.json()["error"]["code"] == "internal", r500.text
        assert "submit bug" not in r500.text and r500.json()["request_id"] == "proto-1"
        metrics = c.get("/metrics").text
    for status in (405, 415, 413, 500, 422):
        line = f'dvreward_requests_total{{route="/v1/score",status="{status}"}}'
        assert line in metrics, (line, [m for m in metrics.splitlines() if "requests_total" in m])
    count = re.search(r'dvreward_request_seconds_count\{route="/v1/score"\} (\d+)', metrics)
    assert count and int(float(count.group(1))) == 6, "every response is in the latency histogram"


# ---- item 10: bodies that do not arrive -----------------------------------------------------------------
def test_a_body_that_never_arrives_gets_408_and_the_connection_closes(serve: Callable[..., Any]) -> None:
    with serve(body_timeout_s=1.0) as url:
        head = b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        raw, took = raw_request(url, head, b'{"groups"', wait=15)
    assert status_of(raw) == 408, raw[:300]
    assert 0.9 < took < 6, took
    assert b"connection: close" in raw.lower() and b"body_timeout" in raw


# ---- admission before the body: requests and bytes in flight ------------------------------------------------------
@contextmanager
def slow_body(url: str, declared: int) -> Iterator[socket.socket]:
    """A request that declares `declared` body bytes and sends a few: the API holds it (and its permit) meanwhile."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/verify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(declared).encode() + b"\r\n\r\n" + b'{"items": [')
        yield s


def verify_body(kit: types.SimpleNamespace) -> dict[str, Any]:
    return {"items": [{"images": [kit.png_b64(3)], "questions": ["Is it red?"]}]}


def test_requests_past_the_in_flight_limit_get_429_before_their_body_is_read(
    serve: Callable[..., Any], kit: types.SimpleNamespace,
) -> None:
    """Nothing bounded concurrent requests: each buffered up to 64 MiB and decoded it before the queue could say 429.
    With one request in flight allowed, a second is 429 with Retry-After from its headers alone (a declared 50 MB
    body that never comes is answered at once); probes are not requests with a body; the permit comes back."""
    with serve(max_inflight_requests=1, body_timeout_s=20) as url, httpx.Client(base_url=url, timeout=30) as c:
        with slow_body(url, 5000):  # once its headers are read, it holds the one permit
            busy = kit.wait_for(lambda: (r := c.post("/v1/verify", json=verify_body(kit))).status_code == 429 and r,
                                10, "a 429 while the slow request holds the permit")
            head = (b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 50000000\r\n\r\n")
            raw, took = raw_request(url, head, b"", wait=10)
            assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
        assert busy.status_code == 429, busy.text
        assert busy.json()["error"]["code"] == "rate_limited" and "DVREWARD_MAX_INFLIGHT_REQUESTS" in busy.text
        assert float(busy.headers["Retry-After"]) >= 1 and busy.headers["Connection"] == "close"
        assert status_of(raw) == 429 and took < 5, (raw[:300], took)
        kit.wait_for(lambda: c.post("/v1/verify", json=verify_body(kit)).status_code == 200, 30,
                     "the slow request's permit to come back once its client left")


def test_bodies_past_the_in_flight_bytes_get_429_and_smaller_ones_pass(
    serve: Callable[..., Any], kit: types.SimpleNamespace,
) -> None:
    """Bytes held count the declared length (and a chunked body as it arrives): 60 KB held of 100 KB leaves room
    for a small request, not for another 60 KB."""
    with serve(max_body_bytes=80_000, max_inflight_bytes=100_000, body_timeout_s=20) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        with slow_body(url, 60_000):
            big = kit.wait_for(lambda: (r := c.post("/v1/verify", content=b" " * 50_000, headers={
                "content-type": "application/json"})).status_code == 429 and r, 10, "a 429 for 50 KB more")
            small = c.post("/v1/verify", json=verify_body(kit))

            def chunks() -> Iterator[bytes]:
                yield b" " * 30_000
                yield b" " * 30_000

            chunked = c.post("/v1/verify", content=chunks(), headers={"content-type": "application/json"})
        assert small.status_code == 200 and small.json()["results"][0]["p"] is not None, small.text
        assert big.status_code == 429 and "DVREWARD_MAX_INFLIGHT_BYTES" in big.text, big.text
        assert chunked.status_code == 429 and "grew to" in chunked.text, chunked.text


# ---- minor defects found under attack -------------------------------------------------------------------------------
def test_a_body_without_content_type_is_read_as_json(serve: Callable[..., Any], kit: types.SimpleNamespace) -> None:
    """curl -d and bare clients send none: FastAPI then did not parse the body at all (a 422 that said the body was
    no object); a body with another type is still 415."""
    body = json.dumps(verify_body(kit)).encode()
    with serve() as url, httpx.Client(base_url=url, timeout=60) as c:
        bare = c.post("/v1/verify", content=body)
        assert "content-type" not in bare.request.headers
        text = c.post("/v1/verify", content=body, headers={"content-type": "text/plain"})
    assert bare.status_code == 200 and bare.json()["results"][0]["p"] is not None, bare.text
    assert text.status_code == 415, text.text


def test_head_answers_on_every_get_route(serve: Callable[..., Any]) -> None:
    """HEAD on /healthz and /metrics was 405: monitors probe with HEAD."""
    with serve() as url, httpx.Client(base_url=url, timeout=30) as c:
        for path in ("/healthz", "/readyz", "/metrics", "/v1/models"):
            head, get = c.head(path), c.get(path)
            assert head.status_code == get.status_code == 200, (path, head.status_code, get.status_code)
            assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path
        assert c.head("/v1/score").status_code == 405
        metrics = c.get("/metrics").text
    assert 'dvreward_requests_total{route="/healthz",status="200"} 2.0' in metrics


@pytest.mark.parametrize("field", ["clip", "eps"])
def test_infinite_clip_or_eps_is_refused(serve: Callable[..., Any], kit: types.SimpleNamespace, field: str) -> None:
    """JSON's Infinity passed `gt=0` / `ge=0`: clip=Infinity meant no clipping (that is null), eps=Infinity zeroed
    every advantage."""
    from dvreward_protocol.schemas import AdvantageOptions

    raw = json.dumps(body(kit)).encode()[:-1] + b', "advantages": {"' + field.encode() + b'": Infinity}}'
    with serve() as url:
        r = httpx.post(url + "/v1/score", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 422, r.text
    assert f"advantages.{field}" in r.json()["error"]["message"] and "finite" in r.json()["error"]["message"]
    with pytest.raises(ValueError, match="finite"):
        AdvantageOptions(**{field: float("inf")})


INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u200e \t"


def test_questions_and_prompts_of_invisible_characters_are_refused(
    serve: Callable[..., Any], kit: types.SimpleNamespace,
) -> None:
    """Zero-width spaces and joiners survive `str.strip()`: such a question was scored as if it asked something."""
    image = kit.png_b64(1)
    with serve() as url, httpx.Client(base_url=url, timeout=60) as c:
        verify = c.post("/v1/verify", json={"items": [{"images": [image], "questions": ["Is it red?", INVISIBLE]}]})
        score = c.post("/v1/score", json={"groups": [{"images": [image], "questions": [
            {"id": "a", "text": INVISIBLE, "tag": "Existence"}]}]})
        prompt = c.post("/v1/score", json={"groups": [{"images": [image], "prompt": INVISIBLE}]})
        decompose = c.post("/v1/decompose", json={"prompts": [INVISIBLE]})
    assert verify.status_code == 422 and "items[0].questions[1]: question is empty" in verify.text, verify.text
    assert score.status_code == 422 and "question text is empty" in score.text, score.text
    assert prompt.status_code == 422 and "groups[0]: give a non-empty `prompt`" in prompt.text, prompt.text
    assert decompose.status_code == 422 and "prompts[0]: prompt is empty" in decompose.text, decompose.text


def test_which_routes_answer_without_a_key_is_a_setting(serve: Callable[..., Any]) -> None:
    """Probes, metrics and docs answered anyone, with no way to close them; now DVREWARD_PUBLIC_ROUTES lists them."""
    key = {"Authorization": "Bearer k1"}
    opened = ("/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json", "/docs/static/swagger-ui.css")
    with serve(api_keys=["k1"]) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert {p: c.get(p).status_code for p in opened} == dict.fromkeys(opened, 200)
        assert c.get("/v1/models").status_code == 401 and c.get("/no-such-route").status_code == 401
    with serve(api_keys=["k1"], public_routes="/healthz") as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/healthz/").status_code != 401
        for path in opened[1:]:
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers=key).status_code == 200, path
    with serve(api_keys=["k1"], public_routes="") as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/healthz").status_code == 401 and c.get("/healthz", headers=key).status_code == 200
