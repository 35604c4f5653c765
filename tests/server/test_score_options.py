"""Scoring options through POST /v1/score on a running service: aggregation, gating, tag weights, binary
answers, and the DSG decomposition pipeline; each reward is recomputed here from the response's own p."""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dvreward_protocol.questions import Question
from dvreward_protocol.reward import Aggregation, Gating, aggregate


@pytest.fixture(scope="module")
def client(embedded_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=embedded_server, timeout=120) as c:
        yield c


def _score(client: httpx.Client, kit: types.SimpleNamespace, **options: Any) -> dict[str, Any]:
    body = {"groups": [{"questions": kit.explicit_questions(), "images": [kit.png_b64(s) for s in (11, 12)]}],
            **options}
    r = client.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_aggregation_and_gating_options_give_the_methods_rewards(client: httpx.Client,
                                                                  kit: types.SimpleNamespace) -> None:
    questions = [Question.model_validate(q) for q in kit.explicit_questions()]
    rewards: dict[tuple[str, str], list[float]] = {}
    for aggregation, gating in itertools.product(list(Aggregation), list(Gating)):
        body = _score(client, kit, aggregation=aggregation.value, gating=gating.value)
        assert (body["aggregation"], body["gating"]) == (aggregation.value, gating.value)
        (group,) = body["groups"]
        for reward, image in zip(group["rewards"], group["images"], strict=True):
            want = aggregate(questions, image["p"], aggregation, gating)
            assert reward == pytest.approx(want.reward, abs=1e-12)
            assert (image["sc"], image["pq"]) == pytest.approx((want.sc, want.pq), abs=1e-12)
        rewards[aggregation.value, gating.value] = group["rewards"]
    # The options reach the service: soft gating scales the child by its parent's p (< 1), and the three
    # aggregations differ unless SC == PQ.
    assert rewards["geometric", "soft"] != rewards["geometric", "none"]
    assert len({tuple(rewards[a.value, "none"]) for a in Aggregation}) == 3


def test_tag_weights(client: httpx.Client, kit: types.SimpleNamespace) -> None:
    """(The binary answer has its own test, in test_fidelity_service.py.)"""
    questions = [Question.model_validate(q) for q in kit.explicit_questions()]
    weights = {"Existence": 3.0, "Attribute": 0.5}
    body = _score(client, kit, tag_weights=weights, aggregation="mean")
    for reward, image in zip(body["groups"][0]["rewards"], body["groups"][0]["images"], strict=True):
        assert reward == pytest.approx(aggregate(questions, image["p"], "mean", tag_weights=weights).reward,
                                       abs=1e-12)


def test_dsg_pipeline_through_the_service(services: Callable[..., Any], kit: types.SimpleNamespace,
                                          tiny_models: dict[str, Path]) -> None:
    """`--pipeline dsg`: a prompt is decomposed by the DSG stages, named in the response, and cached."""
    proc = services("serve", "serve", kit.service_env(pipeline="dsg", request_timeout_s=120), "--verifier",
                    str(tiny_models["verifier"]), "--decomposer", str(tiny_models["decomposer"]), http=True)
    proc.wait_http("/readyz")
    body = {"groups": [{"prompt": "two cats on a sofa", "images": [kit.png_b64(1), kit.png_b64(2)]}]}
    with httpx.Client(base_url=proc.url, timeout=300) as client:
        first = client.post("/v1/score", json=body)
        assert first.status_code == 200, first.text
        scored = first.json()
        assert scored["models"]["pipeline"] == "dsg"
        (group,) = scored["groups"]
        semantic = [q for q in group["questions"] if q["kind"] == "semantic"]
        assert semantic and all(q["id"].startswith("t") and q["metadata"]["dsg_tuple"].startswith(q["id"] + " | ")
                                for q in semantic)
        assert all(r is not None and 0.0 <= r <= 1.0 for r in group["rewards"]) and not group["decomposition_cached"]
        again = client.post("/v1/decompose", json={"prompts": ["two cats on a sofa"]})
        assert again.status_code == 200, again.text
        (decomposition,) = again.json()["decompositions"]
        assert again.json()["cached"] == [True] and decomposition["pipeline"] == "dsg"
        assert decomposition["questions"] == group["questions"]
