"""Through the running service, the reward is the method's: p of the plain chat call, the reference's
answer rule and advantages, the system prompt reported with every response."""

from __future__ import annotations

import io
import math
import types
from typing import Any

import httpx
import pytest
from PIL import Image

from dvreward_protocol.answers import greedy_yes
from server.engines.prompts import VERIFIER_SYSTEM_PROMPT, template_version
from tests.tolerance import P_TOL, SUM_ORDER, assert_advantages_close

pytestmark = pytest.mark.float_sensitive

QUESTIONS = [
    {"id": "cat", "text": "Is there a cat?", "tag": "Existence"},
    {"id": "red", "text": " Is the cat red?", "tag": "Attribute", "depends_on": ["cat"]},
    {"id": "n", "text": "Are there 3 cats?", "tag": "Count"},
    {"id": "q", "text": "Is the cat anatomically correct?", "kind": "quality", "tag": "Anatomy"},
]


@pytest.fixture
def client(embedded_client: httpx.Client) -> httpx.Client:
    return embedded_client


def _large_png() -> bytes:
    """512² but small on the wire (colour blocks): the embedded server's body limit is 200 kB."""
    import numpy as np

    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.kron(blocks, np.ones((64, 64, 1), dtype=np.uint8))).save(buf, "PNG")
    return buf.getvalue()


def _score(client: httpx.Client, groups: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    r = client.post("/v1/score", json={"groups": groups, **options})
    assert r.status_code == 200, r.text
    return r.json()


def test_service_p_is_a_plain_chat_calls(client: httpx.Client, kit: types.SimpleNamespace, tiny_verifier: Any,
                                         plain_chat_p: Any) -> None:
    # a 512² image at the checkpoint's own resolution (324 visual tokens), the default system prompt
    images = [_large_png(), kit.png_bytes(2, (96, 64))]
    body = _score(client, [{"prompt": "a red cat", "questions": QUESTIONS, "images": [kit.b64(b) for b in images]}])
    assert body["verifier_system_prompt"] == VERIFIER_SYSTEM_PROMPT
    assert body["template_version"] == template_version(VERIFIER_SYSTEM_PROMPT)
    v = tiny_verifier
    (group,) = body["groups"]
    asked = {q["id"]: q["text"] for q in group["questions"]}  # question texts as the service keeps them
    assert asked["red"] == "Is the cat red?"
    for data, im in zip(images, group["images"], strict=True):
        pil = Image.open(io.BytesIO(data))
        for qid, text in asked.items():
            want = plain_chat_p(v.model, v.tokenizer, v.image_processor, VERIFIER_SYSTEM_PROMPT, [pil], text)
            assert im["p"][qid] == pytest.approx(want, abs=P_TOL), qid


def test_default_advantages_are_the_references(client: httpx.Client, kit: types.SimpleNamespace) -> None:
    groups = [{"prompt": "a red cat", "questions": QUESTIONS, "images": [kit.png_b64(s) for s in (1, 2, 3)]},
              {"prompt": "a dog", "questions": QUESTIONS, "images": [kit.png_b64(s) for s in (4, 5)]},
              {"prompt": "a red cat", "questions": QUESTIONS, "images": [kit.png_b64(6)]}]
    body = _score(client, groups)
    rewards = [g["rewards"] for g in body["groups"]]
    flat = [r for g in rewards for r in g]
    m = sum(flat) / len(flat)
    std = math.sqrt(sum((r - m) ** 2 for r in flat) / len(flat))  # population std over the whole request
    cat = rewards[0] + rewards[2]  # the same prompt is one group, wherever its images are
    means = [sum(cat) / 4, sum(rewards[1]) / 2, sum(cat) / 4]
    want = [[max(-5.0, min(5.0, (r - mean) / (std + 1e-4))) for r in g["rewards"]]
            for g, mean in zip(body["groups"], means, strict=True)]
    assert_advantages_close([g["advantages"] for g in body["groups"]], want, rewards, reward_noise=SUM_ORDER)
    assert body["warnings"] == []  # group 2's lone image shares its prompt with group 0


def test_a_lone_image_is_warned_about(client: httpx.Client, kit: types.SimpleNamespace) -> None:
    body = _score(client, [{"prompt": "a cat", "questions": QUESTIONS, "images": [kit.png_b64(1)]},
                           {"prompt": "a dog", "questions": QUESTIONS, "images": [kit.png_b64(2), kit.png_b64(3)]}])
    assert body["groups"][0]["advantages"] == [0.0]
    assert [(w["group"], w["code"]) for w in body["warnings"]] == [(0, "lone_image")]
    assert "trains nothing" in body["warnings"][0]["message"]
    metrics = client.get("/metrics").text
    assert 'dvreward_warnings_total{code="lone_image"}' in metrics


def test_binary_reads_the_greedy_answer_not_p(client: httpx.Client, kit: types.SimpleNamespace, tiny_verifier: Any,
                                              plain_chat_p: Any) -> None:
    """The reference's dvreward_binary: 1 where the greedy answer reads yes. The tiny random model answers with
    junk, so binary is 0 everywhere, also where p > 0.5 (which a p > 0.5 rule would have scored 1)."""
    images = [kit.png_bytes(s) for s in (1, 2, 3, 4)]
    group = {"prompt": "a red cat", "questions": QUESTIONS, "images": [kit.b64(b) for b in images]}
    prob = _score(client, [group])
    binary = _score(client, [group], answer="binary")
    assert binary["answer"] == "binary" and prob["answer"] == "prob"
    v = tiny_verifier
    above_half = 0
    for data, pi, bi in zip(images, prob["groups"][0]["images"], binary["groups"][0]["images"], strict=True):
        assert bi["p"] == pi["p"] and pi["answers"] is None  # the evidence stays the probability
        pil = Image.open(io.BytesIO(data))
        for q in QUESTIONS:
            want = plain_chat_p.answer(v.model, v.tokenizer, v.image_processor, VERIFIER_SYSTEM_PROMPT, [pil],
                                       q["text"].strip())
            assert bi["answers"][q["id"]] == want
        yes = {q: float(greedy_yes(a)) for q, a in bi["answers"].items()}
        sc = (yes["cat"] + yes["red"] + yes["n"]) / 3
        assert bi["sc"] == pytest.approx(sc) and bi["pq"] == yes["q"]
        assert bi["reward"] == pytest.approx(math.sqrt(sc * yes["q"]))
        assert bi["failed"] == [q for q, y in yes.items() if not y]
        above_half += sum(p > 0.5 and not yes[q] for q, p in pi["p"].items())
    assert above_half, "some question has p > 0.5 and a greedy answer that is not yes: the two readings differ"


def test_a_configured_system_prompt_is_scored_and_reported(kit: types.SimpleNamespace, tiny_verifier: Any,
                                                           plain_chat_p: Any, tmp_path: Any) -> None:
    from server.engines.hf.verifier import HFVerifier
    from server.runtime import build_app
    from server.settings import Settings

    prompt_file = tmp_path / "paper.txt"
    prompt_file.write_text("You are a strict judge. Reply yes or no.\n", encoding="utf-8")
    settings = Settings(verifier=tiny_verifier.model_id, decomposer="", verifier_system_prompt_file=prompt_file)
    assert settings.verifier_system_prompt == "You are a strict judge. Reply yes or no."
    v = tiny_verifier
    engine = HFVerifier(v.model, v.tokenizer, v.image_processor, model_id=v.model_id,
                        system_prompt=settings.verifier_system_prompt)
    data = kit.png_bytes(3, (64, 48))
    with kit.serve_in_thread(build_app(settings, (engine, None))) as url:
        r = httpx.post(url + "/v1/score", timeout=120, json={
            "groups": [{"prompt": "a red cat", "questions": QUESTIONS, "images": [kit.b64(data)] * 2}]})
        verify = httpx.post(url + "/v1/verify", timeout=120, json={
            "items": [{"images": [kit.b64(data)], "questions": ["Is there a cat?"]}]})
    assert r.status_code == 200 and verify.status_code == 200, (r.text, verify.text)
    body = r.json()
    for response in (body, verify.json()):
        assert response["verifier_system_prompt"] == settings.verifier_system_prompt
        assert response["template_version"] == template_version(settings.verifier_system_prompt)
    assert body["template_version"] != template_version(VERIFIER_SYSTEM_PROMPT)
    pil = Image.open(io.BytesIO(data))
    want = plain_chat_p(v.model, v.tokenizer, v.image_processor, settings.verifier_system_prompt, [pil],
                        "Is there a cat?")
    assert body["groups"][0]["images"][0]["p"]["cat"] == pytest.approx(want, abs=P_TOL)
    assert verify.json()["results"][0]["p"][0] == pytest.approx(want, abs=P_TOL)
    other = plain_chat_p(v.model, v.tokenizer, v.image_processor, VERIFIER_SYSTEM_PROMPT, [pil], "Is there a cat?")
    assert abs(want - other) > 1e-4, "the two prompts must give different p for this check to mean anything"
