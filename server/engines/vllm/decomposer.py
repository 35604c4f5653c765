"""The decomposer on vLLM in the worker process: the shared pipelines over a vLLM decoding backend.

Constrained generation uses vLLM's structured outputs (xgrammar) with the same JSON schemas as the
transformers backend; whitespace between JSON tokens is disabled engine-wide, since the grammar
would otherwise let a weak model pad until max_new_tokens. The DSG validity stage reads exact p
from `logprob_token_ids`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.engines import defaults
from server.engines.answers import YesNo
from server.engines.base import EngineError
from server.engines.decomposition.parse import Generation
from server.engines.decomposition.pipelines import (
    Choice,
    Constraint,
    Messages,
    PipelineDecomposer,
    check_options,
    render_chat,
)
from server.engines.decomposition.schema import Limits
from server.engines.loading import load_error, pretrained_kwargs
from server.engines.vllm.common import VLLMOptions, answer_sampling, load_llm, p_from_output, shutdown


class VLLMBackend:
    """DecodingBackend on an in-process vLLM text model."""

    def __init__(self, ref: str, options: VLLMOptions = VLLMOptions(), *, max_new_tokens: int,
                 retry_temperature: float = 0.7) -> None:
        from transformers import AutoTokenizer

        if max_new_tokens < 1:
            raise EngineError("max_new_tokens must be positive")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(ref, **pretrained_kwargs(ref))
        except (OSError, ValueError) as exc:
            raise EngineError(load_error("decomposer", ref, exc)) from exc
        if not getattr(self.tokenizer, "chat_template", None):
            raise EngineError(f"decomposer {ref} has no chat template; an instruction-tuned model is needed")
        self.model_id = ref
        self.max_new_tokens = max_new_tokens
        self.retry_temperature = retry_temperature
        self.seed = options.seed
        self.llm = load_llm(ref, "decomposer", options,
                            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
        self._answers: YesNo | None = None  # built on first use: only the dsg validity stage needs it

    def close(self) -> None:
        """Stop vLLM's engine processes."""
        shutdown(self.llm)

    def _sampling(self, constraint: Constraint, attempt: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = (StructuredOutputsParams(choice=list(constraint.options)) if isinstance(constraint, Choice)
                      else StructuredOutputsParams(json=constraint.schema))
        if attempt == 0:
            return SamplingParams(max_tokens=self.max_new_tokens, temperature=0.0, structured_outputs=structured)
        return SamplingParams(max_tokens=self.max_new_tokens, temperature=self.retry_temperature,
                              seed=self.seed + attempt, structured_outputs=structured)

    def generate(self, requests: Sequence[tuple[Messages, Constraint]], attempt: int) -> list[Generation]:
        if not requests:
            return []
        prompts = [render_chat(self.tokenizer, m) for m, _ in requests]
        outputs = self.llm.generate(prompts, [self._sampling(c, attempt) for _, c in requests], use_tqdm=False)
        return [Generation(o.outputs[0].text, o.outputs[0].finish_reason == "stop", len(o.outputs[0].token_ids))
                for o in outputs]

    def p_yes(self, conversations: Sequence[Messages]) -> list[float | EngineError]:
        if not conversations:
            return []
        if self._answers is None:
            self._answers = YesNo(self.tokenizer, self.model_id)
        yes, no = list(self._answers.yes_ids), list(self._answers.no_ids)
        outputs = self.llm.generate([render_chat(self.tokenizer, m) for m in conversations],
                                    answer_sampling(yes, no), use_tqdm=False)
        out: list[float | EngineError] = []
        for o in outputs:
            try:
                out.append(p_from_output(o, yes, no))
            except EngineError as exc:
                out.append(exc)
        return out


class VLLMDecomposer(PipelineDecomposer):
    """The Decomposer protocol on vLLM."""

    backend: VLLMBackend

    def __init__(self, ref: str, pipeline: str = defaults.PIPELINE, *, options: VLLMOptions = VLLMOptions(),
                 max_retries: int = 2, limits: Limits, max_new_tokens: int) -> None:
        check_options(pipeline, max_retries)  # bad arguments fail before the model loads
        super().__init__(VLLMBackend(ref, options, max_new_tokens=max_new_tokens), pipeline,
                         max_retries=max_retries, limits=limits)
