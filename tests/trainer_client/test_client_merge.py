"""Merging the requests of one step, on their own (sans I/O): what must agree across requests and what may not."""

from __future__ import annotations

import pytest

from dvreward_protocol.grpo import group_advantages
from dvreward_protocol.schemas import AdvantageOptions, GroupResult, ModelIds, ScoreResponse, Timings
from trainer_client import ScoringError
from trainer_client.jobs import step_response

Q = [{"id": "a", "text": "Is there a cat?", "tag": "Existence"}]


def _response(rid: str, verifier: str, decomposer: str | None, rewards: list[float | None],
              template: str = "t1") -> ScoreResponse:
    return ScoreResponse(
        request_id=rid, models=ModelIds(verifier=verifier, decomposer=decomposer,
                                         pipeline="fast" if decomposer else None),
        template_version=template, verifier_system_prompt="s", aggregation="geometric", gating="none",
        groups=[GroupResult(prompt=rid, questions=Q, rewards=rewards, errors=[None] * len(rewards),
                            advantages=[None] * len(rewards))],
        timings=Timings(total_ms=1.0))


def _merge(*responses: ScoreResponse) -> ScoreResponse:
    groups = [r.groups[0] for r in responses]
    return step_response(groups, [g.prompt for g in groups], list(responses), AdvantageOptions(), [])


def test_requests_that_verified_nothing_or_decomposed_nothing_still_merge():
    explicit = _response("r1", "verifier@sha256:aa", None, [0.2, 0.4])
    decomposed = _response("r2", "verifier@sha256:aa", "decomposer@sha256:bb", [0.6, 0.8])
    all_failed = _response("r3", "the API's own default name", None, [None, None], template="api-default")
    merged = _merge(explicit, decomposed, all_failed)
    assert merged.models == ModelIds(verifier="verifier@sha256:aa", decomposer="decomposer@sha256:bb", pipeline="fast")
    assert merged.template_version == "t1"
    rewards = [[0.2, 0.4], [0.6, 0.8], [None, None]]
    assert [g.advantages for g in merged.groups] == group_advantages(rewards, keys=["r1", "r2", "r3"])


@pytest.mark.parametrize(("second", "what"), [
    (_response("r2", "verifier@sha256:cc", None, [0.5]), "different verifiers"),
    (_response("r2", "verifier@sha256:aa", None, [0.5], template="t2"), "different verifiers or templates"),
])
def test_requests_verified_differently_are_one_inconsistent_step(second, what):
    with pytest.raises(ScoringError, match=what) as info:
        _merge(_response("r1", "verifier@sha256:aa", None, [0.1]), second)
    assert info.value.code == "inconsistent"


def test_requests_decomposed_by_different_decomposers_are_inconsistent():
    with pytest.raises(ScoringError, match="different decomposers"):
        _merge(_response("r1", "v", "decomposer@sha256:bb", [0.1]), _response("r2", "v", "decomposer@sha256:dd", [0.2]))
