"""Request limits from Settings, checked before any work is queued; messages name field and limit."""

from __future__ import annotations

import math

from dvreward_protocol.questions import QUALITY_ASPECTS, SEMANTIC_TAGS, blank
from dvreward_protocol.schemas import ScoreRequest, VerifyRequest
from server.api.parts import Parts, image_bytes
from server.errors import ErrorCode, ServiceError
from server.images import ImageInfo, inspect_image
from server.service import Checked, ScoreImages
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
        if blank(p):
            raise ServiceError(ErrorCode.bad_request, f"prompts[{i}]: prompt is empty (nothing but whitespace or "
                               "invisible characters)")
        check_prompt(f"prompts[{i}]", p, s)


# The Qwen2-VL family: one visual token per 28x28 pixels (14-pixel patches merged 2x2), after the image
# is resized into [min_pixels, max_pixels]; the system prompt and the chat markup come once, and each question
# block adds its text and the answer template.
PIXELS_PER_TOKEN = 28 * 28
TEMPLATE_TOKENS = 64
BLOCK_TOKENS = 16


def text_tokens(text: str) -> int:
    """A bound on the tokens of `text` in every script: byte-level BPE (the Qwen family's tokenizers) emits at most
    one token per UTF-8 byte. Characters / 4 held for English only: CJK and emoji took 4-16 times that."""
    return len(text.encode("utf-8"))


def image_tokens(info: ImageInfo, s: Settings) -> int:
    """Unless a pixel range is configured, the checkpoint's own is unknown here: the image's area counts."""
    area = info.width * info.height
    if s.min_pixels is not None:
        area = max(area, s.min_pixels)
    if s.max_pixels is not None:
        area = min(area, s.max_pixels)
    return math.ceil(area / PIXELS_PER_TOKEN)


def check_tokens(field: str, infos: list[ImageInfo], questions: list[str], s: Settings) -> None:
    """An item is one sequence of a forward pass: estimated from headers and text bytes (no pixel is decoded,
    nothing is tokenized), one the verifier's token budget cannot hold is refused here instead of failing after
    its batch ran."""
    blocks = [text_tokens(q) + BLOCK_TOKENS for q in questions]
    text = sum(blocks) if s.verifier_mode == "packed" else max(blocks)
    n = TEMPLATE_TOKENS + text_tokens(s.verifier_system_prompt) + sum(image_tokens(i, s) for i in infos) + text
    if n > s.max_batch_tokens:
        raise ServiceError(ErrorCode.too_large, f"{field}: about {n} tokens ({len(infos)} images, {len(questions)} "
                           f"questions), more than the verifier's budget of {s.max_batch_tokens} per forward pass "
                           "(DVREWARD_MAX_BATCH_TOKENS): use fewer or shorter questions, or smaller images")


def checked_image(field: str, text: str, s: Settings, parts: Parts | None) -> tuple[Checked, ImageInfo | None]:
    """One image's bytes and header, or the error that fails this image only (never the whole request)."""
    try:
        data = image_bytes(field, text, parts, s.max_image_bytes)
        return data, inspect_image(data, field, s.max_image_pixels)
    except ServiceError as exc:
        return exc, None


def _item_tokens(field: str, infos: list[ImageInfo | None], questions: list[str], s: Settings) -> None:
    """The token budget of an item whose images all read (it is the request's questions that overflow it: 413)."""
    known = [i for i in infos if i is not None]
    if len(known) == len(infos):
        check_tokens(field, known, questions, s)


def check_score(req: ScoreRequest, s: Settings, parts: Parts | None = None) -> ScoreImages:
    """Request-level limits raise (an item the token budget cannot hold too: the request's questions overflow it);
    an image that cannot be read is that image's error, a source that cannot be read its group's. `parts`: the
    images of a multipart body."""
    n_images = sum(len(g.images) + (g.source is not None) for g in req.groups)
    _too_many("groups", len(req.groups), s.max_groups, "groups")
    _too_many("images", n_images, s.max_images, "images in the request (sources included)")
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
    images: list[list[Checked]] = []
    sources: list[Checked | None] = []
    for g, group in enumerate(req.groups):
        source, source_info = (None, None) if group.source is None else checked_image(
            f"groups[{g}].source", group.source, s, parts)
        out: list[Checked] = []
        for i, text in enumerate(group.images):
            data, info = checked_image(f"groups[{g}].images[{i}]", text, s, parts)
            if group.questions is not None:  # decomposed questions are bounded by the decomposer's output
                shown = [source_info, info] if group.source is not None else [info]
                _item_tokens(f"groups[{g}].images[{i}]", shown, [q.text for q in group.questions], s)
            out.append(data)
        images.append(out)
        sources.append(source)
    if parts is not None:
        parts.check_all_named()
    return ScoreImages(images, sources)


def read_images(req: ScoreRequest | VerifyRequest,
                checked: ScoreImages | list[list[bytes] | ServiceError]) -> dict[str, bytes]:
    """Each image text the checks read, to its bytes: the idempotency digest hashes them without decoding again."""
    pairs: list[tuple[str, Checked | None]]
    if isinstance(req, ScoreRequest):
        assert isinstance(checked, ScoreImages)
        pairs = [(t, c) for g, cs in zip(req.groups, checked.images, strict=True)
                 for t, c in zip(g.images, cs, strict=True)]
        pairs += [(g.source, c) for g, c in zip(req.groups, checked.sources, strict=True) if g.source is not None]
    else:
        assert isinstance(checked, list)
        pairs = [(t, b) for it, blobs in zip(req.items, checked, strict=True) if not isinstance(blobs, ServiceError)
                 for t, b in zip(it.images, blobs, strict=True)]
    return {t: c for t, c in pairs if isinstance(c, bytes)}


def check_verify(req: VerifyRequest, s: Settings, parts: Parts | None = None) -> list[list[bytes] | ServiceError]:
    """Request-level limits raise; an item whose image cannot be scored gets that error as its own."""
    _too_many("images", sum(len(it.images) for it in req.items), s.max_images, "images in the request")
    for i, it in enumerate(req.items):
        _too_many(f"items[{i}].images", len(it.images), s.max_images_per_item, "images shown together")
        _too_many(f"items[{i}].questions", len(it.questions), s.max_questions, "questions")
        for k, q in enumerate(it.questions):
            if blank(q):
                raise ServiceError(ErrorCode.bad_request, f"items[{i}].questions[{k}]: question is empty (nothing "
                                   "but whitespace or invisible characters)")
            check_prompt(f"items[{i}].questions[{k}]", q, s)
    out: list[list[bytes] | ServiceError] = []
    for i, it in enumerate(req.items):
        checked = [checked_image(f"items[{i}].images[{j}]", text, s, parts) for j, text in enumerate(it.images)]
        blobs = [data for data, _ in checked if not isinstance(data, ServiceError)]
        _item_tokens(f"items[{i}]", [info for _, info in checked], list(it.questions), s)
        failed = next((d for d, _ in checked if isinstance(d, ServiceError)), None)
        out.append(failed if failed is not None else blobs)
    if parts is not None:
        parts.check_all_named()
    return out
