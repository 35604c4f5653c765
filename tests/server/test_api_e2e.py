"""End to end over real HTTP: `dvreward serve` (embedded queue, no Redis) with the tiny real models."""

from __future__ import annotations

import math
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service_stack import drop_service_settings
from tests.tolerance import P_TOL, assert_rewards_close

pytestmark = pytest.mark.float_sensitive

PROMPT = "a photo of a red car next to a blue house"


@pytest.fixture
def client(embedded_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=embedded_server, timeout=60) as c:
        yield c


def public(name: str, path: Path) -> str:
    """A local checkpoint's public id: its directory's name and the digest of its config and weights index."""
    from server.engines.loading import checkpoint_digest

    digest = checkpoint_digest(path)
    assert digest is not None and len(digest) == 64
    return f"{name}@sha256:{digest[:12]}"


def score_body(kit: types.SimpleNamespace, seeds: list[int], **group: Any) -> dict[str, Any]:
    group.setdefault("questions", kit.explicit_questions())
    return {"groups": [{"images": [kit.png_b64(s) for s in seeds], **group}]}


def test_score_with_explicit_questions(client: httpx.Client, kit: types.SimpleNamespace, tiny_verifier: Any,
                                       tiny_models: dict[str, Path]) -> None:
    questions = kit.explicit_questions()
    r = client.post("/v1/score", json=score_body(kit, [1, 2, 3], prompt="a red cat", metadata={"step": 7}),
                    headers={"X-Request-Id": "e2e-explicit-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == "e2e-explicit-1" == r.headers["X-Request-Id"]
    for name in ("X-Total-Time-Ms", "X-Verify-Time-Ms", "X-Decompose-Time-Ms"):
        assert float(r.headers[name]) >= 0, name
    assert body["models"]["verifier"] == public("verifier", tiny_models["verifier"])
    assert str(tiny_models["verifier"].parent) not in r.text, "no server path in a response"
    assert body["template_version"] and body["aggregation"] == "geometric"

    (group,) = body["groups"]
    assert [q["id"] for q in group["questions"]] == ["cat", "red", "sharp"]
    assert group["decomposition_cached"] is None, "explicit questions are not a decomposition"
    assert group["metadata"] == {"step": 7}
    rewards = group["rewards"]
    assert len(rewards) == 3 and all(r is not None and 0 < r < 1 for r in rewards)
    assert len(group["advantages"]) == 3 and abs(sum(group["advantages"])) < 1e-6
    assert any(abs(a) > 1e-6 for a in group["advantages"]), "different images must get different advantages"
    images = [kit.png_bytes(s) for s in (1, 2, 3)]
    expected_p = kit.local_p(tiny_verifier, images, [q["text"] for q in questions])
    expected_r = kit.local_rewards(tiny_verifier, images, questions)
    for i, im in enumerate(group["images"]):
        assert im["index"] == i and im["error"] is None
        assert list(im["p"]) == ["cat", "red", "sharp"]
        assert [im["p"][q] for q in ("cat", "red", "sharp")] == pytest.approx(expected_p[i], abs=P_TOL)
        assert im["reward"] == rewards[i]
        assert im["failed"] == [q for q in ("cat", "red", "sharp") if im["p"][q] < 0.5]
        assert im["p_source"] == {"cat": "logits", "red": "logits", "sharp": "logits"}  # exact, full logits
    assert_rewards_close([rewards], [expected_r])


def test_score_without_details_omits_per_image_evidence(client: httpx.Client, kit: types.SimpleNamespace) -> None:
    r = client.post("/v1/score", json={**score_body(kit, [4, 5]), "details": False})
    assert r.status_code == 200, r.text
    (group,) = r.json()["groups"]
    assert group["images"] is None and len(group["rewards"]) == 2


def test_score_with_decomposition_is_cached(client: httpx.Client, kit: types.SimpleNamespace) -> None:
    body = {"groups": [{"prompt": PROMPT, "images": [kit.png_b64(s) for s in (7, 8)]}]}
    first = client.post("/v1/score", json=body)
    assert first.status_code == 200, first.text
    (g1,) = first.json()["groups"]
    assert g1["questions"], "the decomposer must produce questions"
    assert g1["decomposition_cached"] is False
    assert all(set(im["p"]) == {q["id"] for q in g1["questions"]} for im in g1["images"])
    assert all(r is not None and 0 < r < 1 for r in g1["rewards"])

    second = client.post("/v1/score", json=body)
    assert second.status_code == 200, second.text
    (g2,) = second.json()["groups"]
    assert g2["decomposition_cached"] is True
    assert g2["questions"] == g1["questions"]
    assert_rewards_close([g2["rewards"]], [g1["rewards"]])
    assert second.json()["request_id"] != first.json()["request_id"]


def test_decompose_endpoint(client: httpx.Client, tiny_models: dict[str, Path]) -> None:
    prompts = ["a cat on a sofa", "two dogs under a tree", "a cat on a sofa"]
    r = client.post("/v1/decompose", json={"prompts": prompts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["X-Request-Id"] == body["request_id"]
    decs = body["decompositions"]
    assert [d["prompt"] for d in decs] == prompts
    assert all(d["questions"] and d["pipeline"] == "fast" for d in decs)
    assert all(d["model"] == public("decomposer", tiny_models["decomposer"]) for d in decs)
    assert str(tiny_models["decomposer"].parent) not in r.text, "no server path in a response"
    assert decs[0] == decs[2], "the same prompt decomposes the same"
    assert body["cached"] == [False, False, False]
    again = client.post("/v1/decompose", json={"prompts": prompts[:2]})
    assert again.status_code == 200 and again.json()["cached"] == [True, True]
    assert again.json()["decompositions"] == decs[:2]


def test_verify_endpoint(client: httpx.Client, kit: types.SimpleNamespace, tiny_verifier: Any) -> None:
    from server.engines.base import VerifyItem
    from server.images import load_image

    qs_a, qs_b = ["Is it red?", "Is there a cat?"], ["Is the background unchanged?"]
    a, src, dst = kit.png_bytes(11), kit.png_bytes(12), kit.png_bytes(13, (48, 40))
    r = client.post("/v1/verify", json={"items": [
        {"images": [kit.b64(a)], "questions": qs_a},
        {"images": [kit.b64(src), kit.b64(dst)], "questions": qs_b},  # editing: source beside result
    ]})
    assert r.status_code == 200, r.text
    body = r.json()
    ps = [res["p"] for res in body["results"]]
    assert [len(p) for p in ps] == [2, 1]
    assert all(0 < x < 1 for p in ps for x in p)
    assert all(res["error"] is None for res in body["results"])
    assert [res["p_source"] for res in body["results"]] == [["logits", "logits"], ["logits"]]
    expected = tiny_verifier.verify([
        VerifyItem((load_image(a, 10**8),), tuple(qs_a)),
        VerifyItem((load_image(src, 10**8), load_image(dst, 10**8)), tuple(qs_b)),
    ])
    assert ps[0] == pytest.approx(expected[0], abs=P_TOL) and ps[1] == pytest.approx(expected[1], abs=P_TOL)


def test_health_ready_models_and_metrics(client: httpx.Client, kit: types.SimpleNamespace,
                                         tiny_models: dict[str, Path]) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["workers"] == 1
    workers = client.get("/v1/models").json()["workers"]
    assert len(workers) == 1
    assert workers[0]["verifier"] == public("verifier", tiny_models["verifier"])
    assert workers[0]["decomposer"] == public("decomposer", tiny_models["decomposer"])
    assert workers[0]["heartbeat_at"] >= workers[0]["started_at"]

    assert client.post("/v1/score", json=score_body(kit, [21])).status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert 'dvreward_requests_total{route="/v1/score",status="200"}' in metrics.text
    line = next(x for x in metrics.text.splitlines() if x.startswith('dvreward_images_total{outcome="ok"}'))
    assert float(line.split()[-1]) >= 1


def test_idempotency_key_replays_the_first_response(client: httpx.Client, kit: types.SimpleNamespace) -> None:
    key = f"idem-{uuid.uuid4().hex}"
    body = score_body(kit, [31, 32])
    first = client.post("/v1/score", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    assert "Idempotent-Replayed" not in first.headers
    second = client.post("/v1/score", json=body, headers={"Idempotency-Key": key})
    assert second.status_code == 200, second.text
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.json()["request_id"] == first.json()["request_id"]
    assert second.json()["groups"][0]["rewards"] == first.json()["groups"][0]["rewards"]

    other = client.post("/v1/score", json=score_body(kit, [33, 34]), headers={"Idempotency-Key": key})
    assert other.status_code == 422, other.text
    assert other.json()["error"]["code"] == "bad_request"
    assert "Idempotency-Key" in other.json()["error"]["message"]

    fresh = client.post("/v1/score", json=body, headers={"Idempotency-Key": key + "-2"})
    assert fresh.status_code == 200 and "Idempotent-Replayed" not in fresh.headers
    assert fresh.json()["request_id"] != first.json()["request_id"], "another key scores anew"


def test_api_keys(kit: types.SimpleNamespace, tiny_verifier: Any, tiny_models: dict[str, Path],
                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys come from DVREWARD_API_KEYS; the app runs in a real uvicorn server in a thread."""
    from server.runtime import build_app
    from server.settings import Settings

    drop_service_settings(monkeypatch)
    monkeypatch.setenv("DVREWARD_API_KEYS", '["k1", "k2"]')
    settings = Settings(verifier=str(tiny_models["verifier"]), decomposer="")
    assert settings.api_keys == ["k1", "k2"]
    body = score_body(kit, [41, 42])
    with kit.serve_in_thread(build_app(settings, (tiny_verifier, None))) as url, \
            httpx.Client(base_url=url, timeout=60) as c:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k1"},
                        {"Authorization": "Basic k1"}, {"Authorization": "Bearer k1x"}):
            r = c.post("/v1/score", json=body, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
            assert "Authorization: Bearer" in r.json()["error"]["message"]
        assert c.get("/v1/models").status_code == 401
        assert c.get("/healthz").status_code == 200, "liveness needs no key"

        ok = c.post("/v1/score", json=body, headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200, ok.text
        assert all(r is not None and not math.isnan(r) for r in ok.json()["groups"][0]["rewards"])
        assert c.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        missing_decomposer = c.post("/v1/score", json={"groups": [{"prompt": "a cat", "images": [kit.png_b64(1)]}]},
                                    headers={"Authorization": "Bearer k1"})
        assert missing_decomposer.status_code == 422
        assert "no decomposer" in missing_decomposer.json()["error"]["message"]


def test_reused_request_id_is_answered_every_time(client: httpx.Client, kit: types.SimpleNamespace) -> None:
    """The X-Request-Id is the client's label only: tasks are named by the server, so reuse cannot collide."""
    for _ in range(2):
        for path, body in (("/v1/score", score_body(kit, [1])),
                           ("/v1/verify", {"items": [{"images": [kit.png_b64(1)], "questions": ["Is it red?"]}]})):
            r = client.post(path, json=body, headers={"X-Request-Id": "step-1"})
            assert r.status_code == 200, r.text
            assert r.json()["request_id"] == "step-1"


def test_tag_weights_that_zero_a_half_are_rejected(client: httpx.Client, kit: types.SimpleNamespace) -> None:
    questions = [q for q in kit.explicit_questions() if q.get("kind", "semantic") == "semantic"]
    weights = {q["tag"]: 0.0 for q in questions}
    r = client.post("/v1/score", json={**score_body(kit, [1], questions=questions), "tag_weights": weights})
    assert r.status_code == 422, r.text
    assert "groups[0]" in r.json()["error"]["message"] and "weight" in r.json()["error"]["message"]


def test_failed_decomposition_fails_only_its_group(services, kit: types.SimpleNamespace,
                                                   tiny_models: dict[str, Path]) -> None:
    """A decomposer that cannot finish (4 new tokens) fails the prompt's group; explicit groups still score."""
    env = kit.service_env(decomposer_max_new_tokens=4, request_timeout_s=60)
    proc = services("serve", "serve", env, "--verifier", str(tiny_models["verifier"]),
                    "--decomposer", str(tiny_models["decomposer"]), http=True)
    proc.wait_http("/readyz")
    body = {"groups": [{"prompt": PROMPT, "images": [kit.png_b64(1), kit.png_b64(2)]},
                       {"prompt": "explicit", "questions": kit.explicit_questions(), "images": [kit.png_b64(3)]}]}
    r = httpx.post(proc.url + "/v1/score", json=body, timeout=120)
    assert r.status_code == 200, r.text
    failed, scored = r.json()["groups"]
    assert failed["rewards"] == [None, None] and failed["questions"] == []
    for im in failed["images"]:
        assert im["error"]["code"] == "decomposition_failed" and "max_new_tokens=4" in im["error"]["message"]
    assert scored["rewards"][0] is not None and 0 < scored["rewards"][0] < 1


def test_every_error_has_the_service_format_and_a_request_id(client: httpx.Client) -> None:
    for method, path, kwargs, status, code in (
        ("GET", "/v1/nope", {}, 404, "not_found"),
        ("GET", "/v1/score", {}, 405, "bad_request"),
        ("POST", "/v1/score", {"content": b"{not json"}, 422, "bad_request"),
    ):
        r = client.request(method, path, headers={"X-Request-Id": "err-1", "content-type": "application/json"},
                           **kwargs)
        assert r.status_code == status, r.text
        body = r.json()
        assert body["error"]["code"] == code and body["error"]["message"]
        assert body["request_id"] == "err-1" == r.headers["X-Request-Id"]
