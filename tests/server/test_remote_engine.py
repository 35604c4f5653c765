"""The OpenAI-compatible remote engine without vLLM: retries, backoff, answer reading, per-item failures.

A scripted chat server (a real FastAPI app on a real port) plays the remote side where the test needs
to choose its answers (429, 5xx, refused parameters); a dead port plays a server that is down. The
same engine against a real vLLM server is tested in tests/vllm/.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from server.engines.base import EngineError, ItemScores, VerifyItem
from server.engines.remote.answer import YesNoIds, answer_body, read_answer
from server.engines.remote.client import ChatClient, RemoteOptions, RequestError
from server.engines.remote.verifier import OpenAIVerifier

IDS = YesNoIds(yes=(11, 12), no=(21,))


def completion(content: str, first: dict[str, Any] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": "length"}
    if first is not None:
        choice["logprobs"] = {"content": [first]}
    return {"id": "x", "object": "chat.completion", "choices": [choice], "usage": {"completion_tokens": 1}}


def top(chosen: tuple[str, float], *others: tuple[str, float]) -> dict[str, Any]:
    return {"token": chosen[0], "logprob": chosen[1],
            "top_logprobs": [{"token": t, "logprob": lp} for t, lp in (chosen, *others)]}


class Script:
    """The scripted server's state: answers to give, in order, and the requests it received."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, dict[str, Any], dict[str, str]]] = []
        self.requests: list[dict[str, Any]] = []
        self.default: Any = None  # a callable(body) -> (status, json) used once `answers` is empty


@pytest.fixture
def script(kit: types.SimpleNamespace) -> Iterator[tuple[Script, str]]:
    state = Script()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        state.requests.append(body)
        if state.answers:
            status, payload, headers = state.answers.pop(0)
        else:
            status, payload = state.default(body)
            headers = {}
        return JSONResponse(payload, status_code=status, headers=headers)

    with kit.serve_in_thread(app) as url:
        yield state, url + "/v1"


def client(url: str, sleeps: list[float], **options: Any) -> ChatClient:
    return ChatClient(url, "served-model", RemoteOptions(**options), sleep=sleeps.append)


# ---- reading an answer (pure) ----------------------------------------------------------------------
def test_exact_answer_uses_the_requested_ids() -> None:
    first = top(("token_id:11", -0.5), ("token_id:12", -2.0), ("token_id:21", -1.0))
    p, source = read_answer(completion("yes", first), IDS)
    py = math.exp(-0.5) + math.exp(-2.0)
    assert source == "logits" and p == pytest.approx(py / (py + math.exp(-1.0)), abs=1e-12)


def test_top_k_answer_applies_the_answer_rule() -> None:
    first = top((" Yes", -0.2), ("no.", -1.9), ("cat", -3.0))
    p, source = read_answer(completion(" Yes", first), None)
    assert source == "top_k"
    assert p == pytest.approx(math.exp(-0.2) / (math.exp(-0.2) + math.exp(-1.9)), abs=1e-12)


def test_text_fallback_only_when_neither_word_is_in_the_top_k() -> None:
    assert read_answer(completion("Yes.", top(("Yes.", -4.0), ("cat", -0.1))), None) == (1.0, "top_k")
    assert read_answer(completion("No", top(("dog", -0.1), ("cat", -0.3))), None) == (0.0, "text")
    with pytest.raises(EngineError, match="no yes/no answer.*'maybe'"):
        read_answer(completion("maybe", top(("maybe", -0.1))), None)


def test_ids_other_than_requested_are_an_error_not_a_guess() -> None:
    with pytest.raises(EngineError, match="other than the requested"):
        read_answer(completion("yes", top(("token_id:11", -0.5), ("token_id:99", -1.0))), IDS)
    with pytest.raises(EngineError, match="not a chat completion"):
        read_answer({"choices": []}, IDS)


def test_request_asks_for_exact_ids_only_when_known() -> None:
    exact = answer_body([{"role": "user", "content": "hi"}], IDS)
    assert exact["logprob_token_ids"] == [11, 12, 21] and exact["return_tokens_as_token_ids"] is True
    assert (exact["max_tokens"], exact["temperature"], exact["logprobs"], exact["top_logprobs"]) == (1, 0.0, True, 20)
    assert "logprob_token_ids" not in answer_body([{"role": "user", "content": "hi"}], None)


# ---- the HTTP client: retries, backoff, errors ---------------------------------------------------
def test_retries_5xx_and_429_with_backoff_then_succeeds(script: tuple[Script, str]) -> None:
    state, url = script
    state.answers = [(503, {"error": "busy"}, {}), (429, {"error": "slow down"}, {"Retry-After": "7"}),
                     (200, completion("yes"), {})]
    sleeps: list[float] = []
    out = client(url, sleeps, retries=3, backoff_s=0.5).chat({"messages": []})
    assert out["choices"][0]["message"]["content"] == "yes"
    assert len(state.requests) == 3 and all(r["model"] == "served-model" for r in state.requests)
    assert len(sleeps) == 2 and 0.0 <= sleeps[0] <= 0.5 and sleeps[1] == 7.0  # jitter, then Retry-After


def test_client_errors_are_not_retried(script: tuple[Script, str]) -> None:
    state, url = script
    state.answers = [(400, {"error": "bad request"}, {})]
    sleeps: list[float] = []
    with pytest.raises(RequestError, match="failed after 1 attempt.*HTTP 400") as err:
        client(url, sleeps, retries=3).chat({"messages": []})
    assert err.value.status == 400 and sleeps == [] and len(state.requests) == 1


def test_a_server_that_is_down_fails_after_every_retry(kit: types.SimpleNamespace) -> None:
    sleeps: list[float] = []
    dead = f"http://{kit.HOST}:{kit.free_port()}/v1"
    with pytest.raises(RequestError, match="failed after 3 attempt") as err:
        client(dead, sleeps, retries=2, backoff_s=0.25).chat({"messages": []})
    assert err.value.status is None and len(sleeps) == 2 and 0 <= sleeps[1] <= 0.5


def test_bad_url_is_refused_at_once() -> None:
    with pytest.raises(EngineError, match="must start with http"):
        ChatClient("localhost:8000/v1", "m")


# ---- the verifier engine against the scripted server ----------------------------------------------
def _image() -> Image.Image:
    return Image.new("RGB", (32, 32), (200, 30, 30))


def test_server_refusing_exact_ids_falls_back_to_top_k(script: tuple[Script, str]) -> None:
    state, url = script
    state.answers = [(400, {"error": "Unrecognized request argument: logprob_token_ids"}, {})]
    state.default = lambda body: (200, completion("no", top(("no", -0.3), ("yes", -1.5))))
    v = OpenAIVerifier(client(url, [], retries=0), "Answer yes or no.", IDS)
    (scores,) = v.verify_each([VerifyItem((_image(),), ("Is it red?",))])
    assert isinstance(scores, ItemScores) and scores.source == ("top_k",)
    assert scores.p[0] == pytest.approx(math.exp(-1.5) / (math.exp(-1.5) + math.exp(-0.3)), abs=1e-12)
    assert v.ids is None and "logprob_token_ids" not in state.requests[-1]
    sent = state.requests[-1]["messages"]
    assert sent[0] == {"role": "system", "content": "Answer yes or no."}
    assert [p["type"] for p in sent[1]["content"]] == ["image_url", "text"]
    assert sent[1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_a_failing_question_fails_its_item_only(script: tuple[Script, str]) -> None:
    state, url = script

    def answer(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        question = body["messages"][-1]["content"][-1]["text"]
        if question == "Is it broken?":
            return 500, {"error": "internal"}
        return 200, completion("yes", top(("yes", -0.1), ("no", -2.5)))

    state.default = answer
    v = OpenAIVerifier(client(url, [], retries=1, backoff_s=0.0), "", None)
    good, bad = v.verify_each([VerifyItem((_image(),), ("Is it red?", "Is it round?")),
                               VerifyItem((_image(),), ("Is it red?", "Is it broken?"))])
    assert isinstance(good, ItemScores) and good.source == ("top_k", "top_k")
    assert isinstance(bad, EngineError) and "question 1 ('Is it broken?')" in str(bad) and "HTTP 500" in str(bad)
    with pytest.raises(EngineError, match="item 1: question 0"):
        v.verify([VerifyItem((_image(),), ("Is it red?",)), VerifyItem((_image(),), ("Is it broken?",))])


def test_greedy_answers_ask_for_the_references_ten_tokens(script: tuple[Script, str]) -> None:
    state, url = script
    state.default = lambda body: (200, completion("Yes, it is red", top(("Yes", -0.1), ("no", -2.5))))
    v = OpenAIVerifier(client(url, [], retries=0), "", None)
    (plain,) = v.verify_each([VerifyItem((_image(),), ("Is it red?",))])
    (greedy,) = v.verify_each([VerifyItem((_image(),), ("Is it red?",))], greedy=True)
    assert [r["max_tokens"] for r in state.requests] == [1, 10]
    assert isinstance(plain, ItemScores) and plain.answers is None
    assert isinstance(greedy, ItemScores) and greedy.answers == ("Yes, it is red",) and greedy.p == plain.p


# ---- the service: an unreachable verifier server gives null rewards with reasons ------------------
def test_unreachable_verifier_server_gives_null_rewards_with_reasons(kit: types.SimpleNamespace, services: Any,
                                                                     tiny_models: dict[str, Any]) -> None:
    dead = f"http://{kit.HOST}:{kit.free_port()}/v1"
    env = kit.service_env(verifier_engine="openai", verifier_url=dead, verifier=tiny_models["verifier"],
                          decomposer="", remote_retries=1, remote_timeout_s=5)
    serve = services("serve-remote", "serve", env, http=True)
    serve.wait_http("/readyz")
    body = {"groups": [{"questions": kit.explicit_questions(), "images": [kit.png_b64(1), kit.png_b64(2)]}]}
    r = httpx.post(serve.url + "/v1/score", json=body, timeout=60)
    assert r.status_code == 200, r.text
    group = r.json()["groups"][0]
    assert group["rewards"] == [None, None]
    for image in group["images"]:
        assert image["error"]["code"] == "verification_failed"
        assert "failed after 2 attempt(s)" in image["error"]["message"] and "ConnectError" in image["error"]["message"]
