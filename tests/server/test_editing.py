"""Editing groups through the running service: the source is shown before every image (the conversation of a
/v1/verify item), the instruction is decomposed with the editing template, and GRPO groups are per source."""

from __future__ import annotations

import io
import types
from typing import Any

import httpx
import pytest
from PIL import Image

from server.engines.prompts import VERIFIER_SYSTEM_PROMPT
from tests.tolerance import P_TOL

pytestmark = pytest.mark.float_sensitive

QUESTIONS = [
    {"id": "red", "text": "Is the car red?", "tag": "Attribute"},
    {"id": "bg", "text": "Is the background unchanged?", "tag": "Environment"},
    {"id": "q", "text": "Is the new colour applied evenly?", "kind": "quality", "tag": "Texture"},
]


@pytest.fixture
def client(embedded_client: httpx.Client) -> httpx.Client:
    return embedded_client


def _post(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_source_is_shown_first_as_in_a_plain_chat_call(client: httpx.Client, kit: types.SimpleNamespace,
                                                           tiny_verifier: Any, plain_chat_p: Any) -> None:
    source, edited = kit.png_bytes(7, (48, 40)), [kit.png_bytes(8, (40, 48)), kit.png_bytes(9)]
    body = _post(client, "/v1/score", {"groups": [{"prompt": "make the car red", "questions": QUESTIONS,
                                                   "source": kit.b64(source), "images": [kit.b64(b) for b in edited]}]})
    verify = _post(client, "/v1/verify", {"items": [{"images": [kit.b64(source), kit.b64(edited[0])],
                                                     "questions": [q["text"] for q in QUESTIONS]}]})
    v = tiny_verifier
    src = Image.open(io.BytesIO(source))
    for data, im in zip(edited, body["groups"][0]["images"], strict=True):
        pil = Image.open(io.BytesIO(data))
        for q in QUESTIONS:
            want = plain_chat_p(v.model, v.tokenizer, v.image_processor, VERIFIER_SYSTEM_PROMPT, [src, pil], q["text"])
            assert im["p"][q["id"]] == pytest.approx(want, abs=P_TOL), q["id"]
    assert verify["results"][0]["p"] == pytest.approx([body["groups"][0]["images"][0]["p"][q["id"]]
                                                       for q in QUESTIONS], abs=P_TOL)
    without = _post(client, "/v1/score", {"groups": [{"prompt": "make the car red", "questions": QUESTIONS,
                                                      "images": [kit.b64(edited[0])]}]})
    assert without["groups"][0]["images"][0]["p"] != body["groups"][0]["images"][0]["p"], "the source is seen"


def test_an_instruction_is_decomposed_with_the_editing_template(client: httpx.Client,
                                                                kit: types.SimpleNamespace) -> None:
    prompt = "turn the sky purple"
    edit = _post(client, "/v1/score", {"groups": [{"prompt": prompt, "source": kit.png_b64(1),
                                                   "images": [kit.png_b64(2), kit.png_b64(3)]}]})
    plain = _post(client, "/v1/score", {"groups": [{"prompt": prompt, "images": [kit.png_b64(2)]}]})
    assert edit["models"]["pipeline"] == "edit" and plain["models"]["pipeline"] == "fast"
    assert edit["groups"][0]["decomposition_cached"] is False and plain["groups"][0]["decomposition_cached"] is False
    assert all(r is not None for r in edit["groups"][0]["rewards"])
    decomposed = _post(client, "/v1/decompose", {"prompts": [prompt], "editing": True})
    assert decomposed["cached"] == [True] and decomposed["decompositions"][0]["pipeline"] == "edit"
    assert decomposed["decompositions"][0]["questions"] == edit["groups"][0]["questions"]


def test_grpo_groups_are_per_prompt_and_source(client: httpx.Client, kit: types.SimpleNamespace) -> None:
    # the same instruction on two sources is two GRPO groups: each one's advantages sum to zero on its own
    groups = [{"prompt": "make the car red", "questions": QUESTIONS, "source": kit.png_b64(src),
               "images": [kit.png_b64(s) for s in seeds]} for src, seeds in ((11, (1, 2)), (12, (4, 5)))]
    body = _post(client, "/v1/score", {"groups": groups})
    for g in body["groups"]:
        assert abs(sum(g["advantages"])) < 1e-9 and any(abs(a) > 1e-6 for a in g["advantages"])
    assert body["warnings"] == []


def test_a_source_that_cannot_be_read_fails_its_group_alone(client: httpx.Client, kit: types.SimpleNamespace) -> None:
    body = _post(client, "/v1/score", {"groups": [
        {"prompt": "make the car red", "questions": QUESTIONS, "source": kit.b64(b"not an image"),
         "images": [kit.png_b64(1), kit.png_b64(2)]},
        {"prompt": "make the car blue", "questions": QUESTIONS, "images": [kit.png_b64(3)]}]})
    bad, good = body["groups"]
    assert bad["rewards"] == [None, None] and good["rewards"][0] is not None
    assert {im["error"]["code"] for im in bad["images"]} == {"bad_image"}
    assert all("groups[0].source" in im["error"]["message"] for im in bad["images"])
