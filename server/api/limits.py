"""Request limits from Settings, checked before any work is queued; messages name field and limit."""

from __future__ import annotations

import math

from dvreward_protocol.questions import QUALITY_ASPECTS, SEMANTIC_TAGS
from dvreward_protocol.schemas import ScoreRequest, VerifyRequest
from server.errors import ErrorCode, ServiceError
from server.images import ImageInfo, decode_base64, inspect_image
from server.settings import Settings


def _too_many(field: str, n: int, limit: int, what: str) -> None:
    if n > limit:
        raise ServiceError(ErrorCode.too_large, f"{field}: {n} {what}, the limit is {limit}")


def check_prompt(field: str, prompt: str | None, s: Settings) -> None:
    if prompt is not None and len(prompt) > s.max_prompt_chars:
        raise ServiceError(ErrorCode.too_large, f"{field}: prompt has {len(prompt)} characters, "
                           f"the limit is {s.max_prompt_chars}")


def check_prompts(prompts: list[str], s: Settings) -> None:
    _too_many("prompts", len(prompts), s.max_groups, "prompts")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ServiceError(ErrorCode.bad_request, f"prompts[{i}]: prompt is empty")
        check_prompt(f"prompts[{i}]", p, s)


# The Qwen2-VL family: one visual token per 28x28 pixels (14-pixel patches merged 2x2), after the image
# is resized into [min_pixels, max_pixels]; each question block adds its text and the answer template.
PIXELS_PER_TOKEN = 28 * 28
TEMPLATE_TOKENS = 64
BLOCK_TOKENS = 16
CHARS_PER_TOKEN = 4


def image_tokens(info: ImageInfo, s: Settings) -> int:
    """Unless a pixel range is configured, the checkpoint's own is unknown here: the image's area counts."""
    area = info.width * info.height
    if s.min_pixels is not None:
        area = max(area, s.min_pixels)
    if s.max_pixels is not None:
        area = min(area, s.max_pixels)
    return math.ceil(area / PIXELS_PER_TOKEN)


def check_tokens(field: str, infos: list[ImageInfo], questions: list[str], s: Settings) -> None:
    """An item is one sequence of a forward pass: estimated from headers and text lengths (no pixel is
    decoded), one the verifier's token budget cannot hold is refused here instead of exhausting memory."""
    blocks = [len(q) // CHARS_PER_TOKEN + BLOCK_TOKENS for q in questions]
    text = sum(blocks) if s.verifier_mode == "packed" else max(blocks)
    n = TEMPLATE_TOKENS + sum(image_tokens(i, s) for i in infos) + text
    if n > s.max_batch_tokens:
        raise ServiceError(ErrorCode.too_large, f"{field}: about {n} tokens ({len(infos)} images, {len(questions)} "
                           f"questions), more than the verifier's budget of {s.max_batch_tokens} per forward pass "
                           "(DVREWARD_MAX_BATCH_TOKENS): use fewer or shorter questions, or smaller images")


def decode_images(field: str, images: list[str], s: Settings) -> tuple[list[bytes], list[ImageInfo]]:
    out, infos = [], []
    for i, text in enumerate(images):
        data = decode_base64(text, f"{field}[{i}]", s.max_image_bytes)
        infos.append(inspect_image(data, f"{field}[{i}]", s.max_image_pixels))
        out.append(data)
    return out, infos


def check_score(req: ScoreRequest, s: Settings) -> list[list[bytes]]:
    """Validate limits and return the raw bytes of every image, per group."""
    _too_many("groups", len(req.groups), s.max_groups, "groups")
    _too_many("images", sum(len(g.images) for g in req.groups), s.max_images, "images in the request")
    for tag, w in (req.tag_weights or {}).items():
        if tag not in SEMANTIC_TAGS and tag not in QUALITY_ASPECTS:
            raise ServiceError(ErrorCode.bad_request, f"tag_weights[{tag!r}]: not a semantic tag or quality aspect; "
                               f"expected one of {', '.join(SEMANTIC_TAGS + QUALITY_ASPECTS)}")
        if not math.isfinite(w) or w < 0:
            raise ServiceError(ErrorCode.bad_request, f"tag_weights[{tag!r}]: must be a finite number >= 0")
    for g, group in enumerate(req.groups):
        check_prompt(f"groups[{g}].prompt", group.prompt, s)
        if group.questions is not None:
            _too_many(f"groups[{g}].questions", len(group.questions), s.max_questions, "questions")
    out = []
    for g, group in enumerate(req.groups):
        blobs, infos = decode_images(f"groups[{g}].images", group.images, s)
        if group.questions is not None:  # decomposed questions are the decomposer's, bounded by its output
            for i, info in enumerate(infos):
                check_tokens(f"groups[{g}].images[{i}]", [info], [q.text for q in group.questions], s)
        out.append(blobs)
    return out


def check_verify(req: VerifyRequest, s: Settings) -> list[list[bytes]]:
    _too_many("images", sum(len(it.images) for it in req.items), s.max_images, "images in the request")
    for i, it in enumerate(req.items):
        _too_many(f"items[{i}].images", len(it.images), s.max_images_per_item, "images shown together")
        _too_many(f"items[{i}].questions", len(it.questions), s.max_questions, "questions")
        for k, q in enumerate(it.questions):
            if not q.strip():
                raise ServiceError(ErrorCode.bad_request, f"items[{i}].questions[{k}]: question is empty")
            check_prompt(f"items[{i}].questions[{k}]", q, s)
    out = []
    for i, it in enumerate(req.items):
        blobs, infos = decode_images(f"items[{i}].images", it.images, s)
        check_tokens(f"items[{i}]", infos, list(it.questions), s)
        out.append(blobs)
    return out
