"""The verifier on vLLM in the worker process: one request per (item, question), exact p.

Every request is the verifier conversation rendered by the model's own chat template, with the
item's images as multimodal data, one greedy token and the full-vocabulary log-probabilities of
exactly the yes/no ids (`logprob_token_ids`), so p is the same quantity the transformers engine
computes. Prefix caching lets the questions of an image share its image block; a worker batch
is submitted at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.core.answer_rule import GREEDY_TOKENS
from server.engines.answers import YesNo
from server.engines.base import EngineError, ItemScores, VerifyItem, scores_or_raise
from server.engines.conversation import IMAGE_PART, verifier_messages
from server.engines.loading import load_error, pretrained_kwargs
from server.engines.resize import Resizer
from server.engines.vllm.common import VLLMOptions, answer_sampling, load_llm, p_from_output, shutdown


class VLLMVerifier:
    """Verifier protocol on an in-process vLLM engine (any vLLM-supported vision-language model)."""

    def __init__(self, llm: Any, tokenizer: Any, resize: Resizer, *, model_id: str, system_prompt: str,
                 max_images: int) -> None:
        self.llm, self.tokenizer, self.resize = llm, tokenizer, resize
        self.model_id = model_id
        self.system_prompt = system_prompt
        self.max_images = max_images
        answers = YesNo(tokenizer, model_id)
        self.yes_ids, self.no_ids = list(answers.yes_ids), list(answers.no_ids)
        self.sampling = answer_sampling(self.yes_ids, self.no_ids)
        self.greedy_sampling = answer_sampling(self.yes_ids, self.no_ids, GREEDY_TOKENS)

    @classmethod
    def load(cls, ref: str, *, system_prompt: str, options: VLLMOptions = VLLMOptions(),
             min_pixels: int | None = None, max_pixels: int | None = None, max_images: int = 2) -> VLLMVerifier:
        """Load the model into vLLM. Images are resized here exactly as the transformers engine resizes them
        (the checkpoint's pixel range unless `min_pixels` / `max_pixels` override it); `max_images` per item."""
        from transformers import AutoTokenizer

        resize = Resizer.from_pretrained(ref, "verifier", min_pixels, max_pixels)
        try:
            tokenizer = AutoTokenizer.from_pretrained(ref, **pretrained_kwargs(ref))
        except (OSError, ValueError) as exc:
            raise EngineError(load_error("verifier", ref, exc)) from exc
        llm = load_llm(ref, "verifier", options, limit_mm_per_prompt={"image": max_images})
        return cls(llm, tokenizer, resize, model_id=ref, system_prompt=system_prompt, max_images=max_images)

    def close(self) -> None:
        """Stop vLLM's engine processes."""
        shutdown(self.llm)

    def _prompt(self, n_images: int, question: str) -> str:
        messages = verifier_messages(self.system_prompt, question, [IMAGE_PART] * n_images)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def verify(self, items: Sequence[VerifyItem]) -> list[list[float]]:
        return scores_or_raise(self.verify_each(items))

    def verify_each(self, items: Sequence[VerifyItem], *, greedy: bool = False) -> list[ItemScores | EngineError]:
        """Every (item, question) in one generate call; an item whose answer cannot be read fails alone. With
        `greedy`, the greedy answer (up to GREEDY_TOKENS tokens) too; p is still read at its first token."""
        requests: list[dict[str, Any]] = []
        for it in items:
            if not it.images or not it.questions:
                raise ValueError("a verification item needs at least one image and one question")
            if len(it.images) > self.max_images:
                raise ValueError(f"an item has {len(it.images)} images; this verifier takes at most {self.max_images}")
            images = [self.resize(im) for im in it.images]
            requests += [{"prompt": self._prompt(len(images), q), "multi_modal_data": {"image": images}}
                         for q in it.questions]
        sampling = self.greedy_sampling if greedy else self.sampling
        outputs = iter(self.llm.generate(requests, sampling, use_tqdm=False))
        out: list[ItemScores | EngineError] = []
        for it in items:
            ps: list[float] = []
            answers: list[str] = []
            errors: list[str] = []
            for k, q in enumerate(it.questions):
                output = next(outputs)
                try:
                    ps.append(p_from_output(output, self.yes_ids, self.no_ids))
                    answers.append(output.outputs[0].text)
                except EngineError as exc:
                    errors.append(f"question {k} ({q[:60]!r}): {exc}")
            out.append(EngineError("; ".join(errors)) if errors else ItemScores.exact(ps, answers if greedy else None))
        return out
