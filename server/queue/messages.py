"""What travels between the API and the workers: typed tasks and results, JSON on the wire (never pickled).

A task's kind is its payload's type, so a verify task cannot carry a prompt; a result holds either
the typed value of its kind or an error, never both. Both sides validate what they read, so a
malformed message is an error where it is read, not a KeyError deep in the service.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dvreward_protocol.answers import PSource
from dvreward_protocol.questions import Decomposition
from server.errors import ErrorCode, scrub


class TaskKind(StrEnum):
    verify = "verify"
    decompose = "decompose"


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VerifyPayload(_Message):
    """Score these questions on the task's images (its blobs); `greedy`: also the greedy answers (binary reward)."""

    kind: Literal[TaskKind.verify] = TaskKind.verify
    questions: tuple[str, ...]
    greedy: bool = False


class DecomposePayload(_Message):
    kind: Literal[TaskKind.decompose] = TaskKind.decompose
    prompt: str
    editing: bool = False  # an editing instruction: decomposed with the editing template


Payload = Annotated[VerifyPayload | DecomposePayload, Field(discriminator="kind")]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class Verified(_Message):
    """One item's p per question, with what produced them: the API may run other settings than the worker."""

    kind: Literal["verified"] = "verified"
    p: tuple[Probability, ...]
    p_source: tuple[PSource, ...]
    model: str
    template_version: str
    system_prompt: str
    answers: tuple[str, ...] | None = None  # the greedy answers, when the task asked for them

    @model_validator(mode="after")
    def _one_source_per_p(self) -> Verified:
        if len(self.p_source) != len(self.p):
            raise ValueError(f"{len(self.p)} p values but {len(self.p_source)} sources")
        if self.answers is not None and len(self.answers) != len(self.p):
            raise ValueError(f"{len(self.p)} p values but {len(self.answers)} greedy answers")
        return self


class Decomposed(_Message):
    kind: Literal["decomposed"] = "decomposed"
    decomposition: Decomposition


class Failure(_Message):
    code: ErrorCode
    message: str


class _Header(_Message):
    task_id: str
    reply_to: str
    deadline: float
    payload: Payload


@dataclass
class Task:
    """One unit of work. `blobs` are raw image bytes, sent beside the JSON header."""

    task_id: str
    reply_to: str  # opaque name of the request's replies; each broker maps it onto its own storage
    deadline: float  # epoch seconds; past it nobody waits for the result
    payload: VerifyPayload | DecomposePayload
    blobs: list[bytes] = field(default_factory=list)
    delivery: int = 1
    receipt: str | None = None  # broker-specific handle used to acknowledge

    @property
    def kind(self) -> TaskKind:
        return self.payload.kind

    def header(self) -> bytes:
        return _Header(task_id=self.task_id, reply_to=self.reply_to, deadline=self.deadline,
                       payload=self.payload).model_dump_json().encode()

    @classmethod
    def from_header(cls, raw: bytes, blobs: list[bytes], receipt: str | None) -> Task:
        h = _Header.model_validate_json(raw)
        return cls(h.task_id, h.reply_to, h.deadline, h.payload, blobs, receipt=receipt)

    @property
    def expired(self) -> bool:
        return time.time() > self.deadline


class Result(_Message):
    """A task's outcome: the value of its kind, or the error that stopped it."""

    task_id: str
    value: Annotated[Verified | Decomposed, Field(discriminator="kind")] | None = None
    error: Failure | None = None

    @model_validator(mode="after")
    def _value_or_error(self) -> Result:
        if (self.value is None) == (self.error is None):
            raise ValueError("a result holds exactly one of a value and an error")
        return self

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Result:
        return cls.model_validate_json(raw)

    @classmethod
    def failure(cls, task_id: str, code: ErrorCode, message: str) -> Result:
        return cls(task_id=task_id, error=Failure(code=code, message=scrub(message)))
