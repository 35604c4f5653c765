"""The verifier scores exactly the method's conversation, tokens, resolution and answer rule.

The reference is `plain_chat_p` (tests/conftest.py): a plain transformers chat call written apart from
the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.engines.base import EngineError, VerifyItem
from server.engines.hf.verifier import HFVerifier
from server.engines.prompts import VERIFIER_SYSTEM_PROMPT
from server.engines.tiny import QWEN_MAX_PIXELS, VERIFIER_ARCHS, write_tiny_verifier
from tests.tolerance import P_TOL

pytestmark = pytest.mark.float_sensitive

# Leading spaces, punctuation, digits, unicode, a question that starts with punctuation or a newline.
QUESTIONS = (
    "Is there a cat?", " Is there a cat?", "Are there 3 apples?", "Is the sign's text \"OPEN 24/7\"?",
    "¿Hay un perro?", "Is the café naïve-looking, ünïcödé?", "?Is it red", "12 birds?", "Yes or no: is it blue?",
    "\nIs it night?", "Is it   spaced?", "Red!", "Does the 2nd car (left) face right?",
)
SYSTEM_PROMPTS = (VERIFIER_SYSTEM_PROMPT, "Answer yes or no.", "")


def _image(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=VERIFIER_ARCHS)
def verifier(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> HFVerifier:
    path = write_tiny_verifier(tmp_path_factory.mktemp(request.param), arch=request.param)
    return HFVerifier.load(str(path))


@pytest.mark.parametrize("system_prompt", SYSTEM_PROMPTS)
def test_token_ids_are_the_chat_templates(verifier: HFVerifier, system_prompt: str, plain_chat_p: Any) -> None:
    verifier.system_prompt = system_prompt
    try:
        for n_images in (1, 2):
            item = VerifyItem(tuple(_image(s, 64 + 8 * s, 56) for s in range(n_images)), QUESTIONS)
            [prep] = verifier._prepare(item)  # one shared prefix: the image block is common to all
            assert verifier.image_token_id in prep.prefix and len(prep.blocks) == len(QUESTIONS)
            for q, block in zip(QUESTIONS, prep.blocks, strict=True):
                ids = plain_chat_p.template_ids(verifier.tokenizer, system_prompt, n_images, q)
                want = plain_chat_p.expanded(ids, verifier.image_token_id, prep.grid_thw, verifier.merge)
                assert prep.prefix + block == want, q
    finally:
        verifier.system_prompt = VERIFIER_SYSTEM_PROMPT


def test_conversation_is_system_images_question_only(verifier: HFVerifier) -> None:
    text = verifier.tokenizer.decode(verifier.token_ids(2, "Is the background unchanged?"))
    # system message, then the two images in order, then the question itself, then the generation prompt
    assert text.startswith(f"<|im_start|>system\n{VERIFIER_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|vision_end|><|vision_start|><|image_pad|><|vision_end|>Is the background unchanged?"
                         "<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|image_pad|>") == 2


def test_answer_ids_are_every_token_that_reads_yes_or_no(verifier: HFVerifier, plain_chat_p: Any) -> None:
    yes, no = plain_chat_p.answer_sets(verifier.tokenizer)
    assert verifier.answers.yes_ids == yes and verifier.answers.no_ids == no
    # the tiny tokenizer has a glued variant ("?Yes"), which a fixed list of spellings would miss
    assert any(verifier.tokenizer.decode([i]) == "?Yes" for i in yes)


def test_checkpoint_resolution_is_the_default(verifier: HFVerifier) -> None:
    # a 512² image stays 512² (rounded to the 28-pixel grid) under the checkpoint's 12.8M-pixel cap:
    # 504 / 28 = 18 merged patches a side, 324 visual tokens (a 448² cap would give 256)
    patch = verifier.image_processor.patch_size * verifier.merge
    assert verifier.image_processor.size["longest_edge"] == QWEN_MAX_PIXELS
    grid = verifier.image_processor(images=[_image(0, 512, 512)], return_tensors="pt")["image_grid_thw"]
    side = round(512 / patch)
    assert int(grid.prod()) // verifier.merge**2 == side * side


def test_pixel_overrides_apply(tmp_path: Path) -> None:
    path = write_tiny_verifier(tmp_path / "v")
    v = HFVerifier.load(str(path), max_pixels=448 * 448)
    grid = v.image_processor(images=[_image(0, 512, 512)], return_tensors="pt")["image_grid_thw"]
    assert int(grid.prod()) // v.merge**2 == 256  # 448 / 28 = 16 a side
    with pytest.raises(EngineError, match=r"verifier pixel range: need 0 < min_pixels <= max_pixels, got 13000000"):
        HFVerifier.load(str(path), min_pixels=13_000_000)  # above the checkpoint's own 12.8M maximum


@pytest.mark.parametrize("mode", ["packed", "per_pair"])
def test_p_equals_a_plain_transformers_chat_call(verifier: HFVerifier, mode: str, plain_chat_p: Any) -> None:
    items = [
        VerifyItem((_image(1, 100, 60),), QUESTIONS[:7]),
        VerifyItem((_image(2, 512, 512),), QUESTIONS[7:]),
        VerifyItem((_image(3, 120, 200), _image(4, 64, 64)), ("Is the background unchanged?", " Is it blue?")),
    ]
    verifier.mode = mode
    try:
        got = verifier.verify(items)
    finally:
        verifier.mode = "packed"
    for item, ps in zip(items, got, strict=True):
        for q, p in zip(item.questions, ps, strict=True):
            want = plain_chat_p(verifier.model, verifier.tokenizer, verifier.image_processor, verifier.system_prompt,
                                list(item.images), q)
            assert p == pytest.approx(want, abs=P_TOL), q


def test_greedy_answers_are_a_plain_chat_calls(verifier: HFVerifier, plain_chat_p: Any) -> None:
    """The binary reward reads the greedy answer; batched (left-padded) it is what one chat call generates."""
    items = [VerifyItem((_image(5, 90, 70),), QUESTIONS[:4]),
             VerifyItem((_image(6, 64, 64), _image(7, 48, 80)), ("Is the background unchanged?",))]
    got = verifier.greedy_answers(items)
    for item, answers in zip(items, got, strict=True):
        for q, a in zip(item.questions, answers, strict=True):
            assert a == plain_chat_p.answer(verifier.model, verifier.tokenizer, verifier.image_processor,
                                            verifier.system_prompt, list(item.images), q), q
    scores = verifier.verify_each(items, greedy=True)
    assert [list(s.answers) for s in scores] == got and all(s.answers for s in scores)
    assert all(s.answers is None for s in verifier.verify_each(items))


# A chat template that writes the question before the images: the questions then share no prefix that
# holds the image block, so each question must get a prefix of its own, still with the template's ids.
TEXT_FIRST = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_questions_that_change_the_prefix_get_their_own(verifier: HFVerifier, plain_chat_p: Any) -> None:
    item = VerifyItem((_image(5, 80, 64),), ("Is there a cat?", "Red?", "Are there 3 apples?"))
    original = verifier.tokenizer.chat_template
    verifier.tokenizer.chat_template = TEXT_FIRST
    try:
        preps = verifier._prepare(item)
        assert [p.slots for p in preps] == [[0], [1], [2]]
        for prep, q in zip(preps, item.questions, strict=True):
            ids = plain_chat_p.template_ids(verifier.tokenizer, verifier.system_prompt, 1, q)
            want = plain_chat_p.expanded(ids, verifier.image_token_id, prep.grid_thw, verifier.merge)
            assert prep.prefix + prep.blocks[0] == want
        got = verifier.verify([item, VerifyItem((_image(6, 64, 64),), ("Is it blue?",))])
        for q, p in zip(item.questions, got[0], strict=True):
            want = plain_chat_p(verifier.model, verifier.tokenizer, verifier.image_processor,
                                verifier.system_prompt, list(item.images), q)
            assert p == pytest.approx(want, abs=P_TOL), q
    finally:
        verifier.tokenizer.chat_template = original
