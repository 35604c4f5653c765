"""The JSON wire format of /v1, shared by the API and the trainer client.

Pure pydantic (no FastAPI, torch or PIL), so the trainer client imports it without the
server stack. Limits that depend on deployment settings are enforced by the API, not here.

/v1/score and /v1/verify also take their body as multipart/form-data (RFC 7578), which carries images as
bytes instead of base64 (a third fewer bytes, and no encoding on either side): the first part, named
`request`, is the JSON body described here, and each image is a part of its own, which the JSON names as
`part:NAME` where it would hold the base64 string (every part after the first is named by some image).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dvreward_protocol.answers import PSource
from dvreward_protocol.questions import Decomposition, Metadata, Question, Text
from dvreward_protocol.reward import Aggregation, Gating

Answer = Literal["prob", "binary"]
MULTIPART = "multipart/form-data"
REQUEST_PART = "request"  # the multipart form's first part: the JSON body
PART_REF = "part:"  # an image string `part:NAME`: the bytes of the multipart form's part NAME
IMAGE = "base64 PNG / JPEG / WebP (data URLs accepted); in a multipart/form-data body also `part:NAME`, the part NAME"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdvantageOptions(_Model):
    """The reference's GRPO advantages by default: (r - prompt mean) / (population std of the step + eps), clipped."""

    std: Literal["group", "global"] = Field("global", description="std over all rewards of the request, or per group")
    # Infinity passes gt=0 and ge=0: no clipping is null, and an infinite eps would zero every advantage.
    clip: float | None = Field(5.0, gt=0, allow_inf_nan=False, description="clip advantages to ±clip; null: no "
                               "clipping")
    eps: float = Field(1e-4, ge=0, allow_inf_nan=False)


class ScoreGroup(_Model):
    prompt: Text | None = Field(None, description="the generation prompt (or editing instruction); decomposed "
                                "unless questions are given")
    questions: list[Question] | None = Field(None, description="explicit questions: skip the decomposer")
    images: list[str] = Field(min_length=1, description=IMAGE)
    source: str | None = Field(None, description="editing: the image the group's images were edited from (as an "
                               "image of `images`); shown before each image, and the prompt is decomposed as an "
                               "editing instruction")
    metadata: Metadata = Field(default_factory=dict)


class ScoreRequest(_Model):
    groups: list[ScoreGroup] = Field(min_length=1)
    aggregation: Aggregation = Aggregation.geometric
    gating: Gating = Gating.none
    tag_weights: dict[str, float] | None = None
    advantages: AdvantageOptions = Field(default_factory=AdvantageOptions)
    answer: Answer = Field(
        "prob", description="prob: p = P(yes)/(P(yes)+P(no)); binary: the reference's dvreward_binary, 1 where "
        "the greedy answer (up to 10 tokens; lower-cased, stripped, without . , ? !) is yes, else 0"
    )
    details: bool = Field(True, description="include per-image, per-question p")


class ErrorInfo(_Model):
    code: str
    message: str


class ImageResult(_Model):
    index: int
    reward: float | None
    sc: float | None = None
    pq: float | None = None
    p: dict[str, float] | None = Field(None, description="question id -> P(yes)/(P(yes)+P(no))")
    p_source: dict[str, PSource] | None = Field(
        None, description="question id -> how p was read: logits (exact), top_k (top-20 log-probabilities) or "
        "text (neither answer in the top-20: the generated word, 1 or 0)"
    )
    answers: dict[str, str] | None = Field(
        None, description="binary: question id -> the greedy answer that decided its 1 or 0"
    )
    failed: list[str] = Field(default_factory=list, description="ids of questions answered no (p <= 0.5: yes does not "
                              "outweigh no; binary: the greedy answer is not yes)")
    error: ErrorInfo | None = None


class GroupResult(_Model):
    prompt: str | None
    questions: list[Question]
    rewards: list[float | None] = Field(description="one per image; null where that image failed")
    errors: list[ErrorInfo | None] = Field(
        description="one per image: why it has no reward (code and reason), null where it has one; whatever "
        "`details` says"
    )
    advantages: list[float | None]
    images: list[ImageResult] | None = Field(None, description="per image; null when the request asked for no "
                                             "`details`")
    decomposition_cached: bool | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class Warning(_Model):
    """Something that scored but may not train or mean what it seems; `group` indexes the request's groups."""

    group: int | None = None
    code: Literal["lone_image", "question_cap"]
    message: str


class Timings(_Model):
    decompose_ms: float = 0.0
    verify_ms: float = 0.0
    total_ms: float = 0.0


class ModelIds(_Model):
    verifier: str
    decomposer: str | None
    pipeline: str | None = None


class ScoreResponse(_Model):
    request_id: str
    models: ModelIds
    template_version: str
    verifier_system_prompt: str
    aggregation: Aggregation
    gating: Gating
    answer: Answer = "prob"
    groups: list[GroupResult]
    warnings: list[Warning] = Field(default_factory=list)
    timings: Timings


class DecomposeRequest(_Model):
    prompts: list[Text] = Field(min_length=1)
    editing: bool = Field(False, description="the prompts are editing instructions (as /v1/score groups with a source)")


class DecomposeResponse(_Model):
    request_id: str
    decompositions: list[Decomposition]
    cached: list[bool]
    timings: Timings


class VerifyItemIn(_Model):
    images: list[str] = Field(min_length=1, description="one image, or source and result for editing; each " + IMAGE)
    questions: list[Text] = Field(min_length=1)


class VerifyRequest(_Model):
    items: list[VerifyItemIn] = Field(min_length=1)


class VerifyItemResult(_Model):
    p: list[float] | None
    p_source: list[PSource] | None = Field(None, description="per question: logits, top_k or text (see ImageResult)")
    error: ErrorInfo | None = None


class VerifyResponse(_Model):
    request_id: str
    model: str
    template_version: str
    verifier_system_prompt: str
    results: list[VerifyItemResult]
    timings: Timings


class WorkerInfo(_Model):
    worker_id: str
    verifier: str
    decomposer: str | None
    pipeline: str | None
    template_version: str
    capacity: int
    started_at: float
    heartbeat_at: float


class ModelsResponse(_Model):
    workers: list[WorkerInfo]


class ErrorResponse(_Model):
    error: ErrorInfo
    request_id: str | None = None

