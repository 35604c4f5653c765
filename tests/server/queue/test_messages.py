"""Typed messages between the API and the workers: what a malformed one looks like is refused where it is read."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from server.errors import ErrorCode
from server.queue.messages import (
    Decomposed,
    DecomposePayload,
    Failure,
    Result,
    Task,
    TaskKind,
    Verified,
    VerifyPayload,
)


def verified(*p: float) -> Verified:
    return Verified(p=p, p_source=("logits",) * len(p), model="m", template_version="t", system_prompt="s")


def test_a_tasks_kind_is_its_payloads_and_survives_the_header() -> None:
    task = Task("t:0", "r", 123.5, VerifyPayload(questions=("Is it red?", "Ünïcode?")), [b"\x00\xff"])
    assert task.kind is TaskKind.verify
    back = Task.from_header(task.header(), task.blobs, receipt="1-0")
    assert (back.task_id, back.reply_to, back.deadline, back.payload, back.kind) == (
        "t:0", "r", 123.5, VerifyPayload(questions=("Is it red?", "Ünïcode?")), TaskKind.verify)
    assert Task("t:1", "r", 1.0, DecomposePayload(prompt="a cat")).kind is TaskKind.decompose


@pytest.mark.parametrize("payload", [
    {"kind": "verify", "prompt": "a cat"},  # a verify task carrying a prompt
    {"kind": "decompose", "questions": ["q?"]},
    {"kind": "paint", "prompt": "a cat"},
    {"questions": ["q?"]},  # no kind
])
def test_a_header_whose_payload_does_not_match_its_kind_is_refused(payload: dict[str, object]) -> None:
    raw = json.dumps({"task_id": "t", "reply_to": "r", "deadline": 1.0, "payload": payload}).encode()
    with pytest.raises(ValidationError):
        Task.from_header(raw, [], None)


def test_results_round_trip_typed() -> None:
    from dvreward_protocol.questions import Decomposition, Question

    dec = Decomposition(prompt="a cat", questions=(Question(id="q1", text="Is there a cat?", tag="Existence"),))
    for result in (Result(task_id="a", value=verified(0.0, 0.25, 1.0)),
                   Result(task_id="b", value=Decomposed(decomposition=dec)),
                   Result.failure("c", ErrorCode.bad_image, "not an image <_io.BytesIO object at 0x7f00aa>")):
        assert Result.from_json(result.to_json()) == result
    assert Result.failure("c", ErrorCode.bad_image, "<_io.BytesIO object at 0x7f00aa>").error == Failure(
        code=ErrorCode.bad_image, message="<_io.BytesIO>"), "no heap addresses reach a client"


def test_a_result_holds_a_value_or_an_error_never_both_or_neither() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        Result(task_id="x", value=verified(0.5), error=Failure(code=ErrorCode.internal, message="m"))
    with pytest.raises(ValidationError, match="exactly one"):
        Result(task_id="x")


@pytest.mark.parametrize("p", [float("nan"), float("inf"), -0.01, 1.5])
def test_verified_p_is_a_probability(p: float) -> None:
    with pytest.raises(ValidationError):
        verified(0.5, p)


def test_verified_has_one_source_per_p() -> None:
    with pytest.raises(ValidationError, match="2 p values but 1 sources"):
        Verified(p=(0.1, 0.2), p_source=("logits",), model="m", template_version="t", system_prompt="s")
