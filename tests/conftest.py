"""Shared fixtures: tiny random models built once per session through the real writer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Tests never reach a hub: set before transformers / huggingface_hub are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest

pytest_plugins = ["tests.service_stack"]  # redis_server, redis_url, services: the one way tests start things


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from server.engines.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("tiny-models")
    paths = write_tiny_models(root)
    return {k: Path(v) for k, v in paths.items()}


@pytest.fixture(scope="session")
def plain_chat_p() -> Any:
    """p of one (images, question) from a plain transformers chat call, written apart from the engines.

    The chat template's own ids (system prompt, the images, the question), each image placeholder
    expanded to its patch count, the image processor at the checkpoint's settings, one ordinary forward
    pass, and p summed over every vocabulary entry that reads yes / no (lower-cased, stripped of
    whitespace and . , ? !).
    """
    import string

    import torch

    strip = string.whitespace + ".,?!"

    def template_ids(tokenizer: Any, system_prompt: str, n_images: int, question: str) -> list[int]:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])

    def answer_sets(tokenizer: Any) -> tuple[list[int], list[int]]:
        words = [tokenizer.decode([i]).lower().strip(strip) for i in range(len(tokenizer))]
        return [i for i, w in enumerate(words) if w == "yes"], [i for i, w in enumerate(words) if w == "no"]

    def expanded(ids: list[int], pad: int, grid_thw: Any, merge_size: int) -> list[int]:
        """Each image placeholder repeated once per merged patch of its image."""
        counts = iter(int(n) // merge_size**2 for n in grid_thw.prod(-1).tolist())
        out: list[int] = []
        for t in ids:
            out.extend([t] * next(counts) if t == pad else [t])
        return out

    def inputs(model: Any, tokenizer: Any, image_processor: Any, system_prompt: str, images: list[Any],
               question: str) -> dict[str, Any]:
        vis = image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pad = model.config.image_token_id
        ids = expanded(template_ids(tokenizer, system_prompt, len(images), question), pad, vis["image_grid_thw"],
                       image_processor.merge_size)
        x = torch.tensor([ids])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "pixel_values": vis["pixel_values"],
                "image_grid_thw": vis["image_grid_thw"], "mm_token_type_ids": (x == pad).int()}

    def plain_p(model: Any, tokenizer: Any, image_processor: Any, system_prompt: str, images: list[Any],
                question: str) -> float:
        with torch.inference_mode():
            out = model(**inputs(model, tokenizer, image_processor, system_prompt, images, question))
        prob = torch.softmax(out.logits[0, -1].double(), dim=-1)
        yes, no = answer_sets(tokenizer)
        return float(prob[yes].sum() / (prob[yes].sum() + prob[no].sum()))

    def answer(model: Any, tokenizer: Any, image_processor: Any, system_prompt: str, images: list[Any],
               question: str) -> str:
        """The chat call at temperature 0 with at most 10 new tokens, as the reference asks for its binary answer;
        the text is what a chat API returns as content (special tokens left out)."""
        x = inputs(model, tokenizer, image_processor, system_prompt, images, question)
        with torch.inference_mode():
            out = model.generate(**x, max_new_tokens=10, do_sample=False)
        return tokenizer.decode(out[0, x["input_ids"].shape[1]:], skip_special_tokens=True)

    plain_p.answer = answer  # type: ignore[attr-defined]
    plain_p.template_ids = template_ids  # type: ignore[attr-defined]
    plain_p.expanded = expanded  # type: ignore[attr-defined]
    plain_p.answer_sets = answer_sets  # type: ignore[attr-defined]
    return plain_p
