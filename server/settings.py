"""All service settings: one pydantic-settings class, environment prefix DVREWARD_.

Every CLI flag of `dvreward serve|api|worker` maps onto a field here, so a deployment can be
configured entirely by environment (docker-compose) or entirely by flags.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.engines import defaults
from server.engines.prompts import VERIFIER_SYSTEM_PROMPT, read_system_prompt

if TYPE_CHECKING:
    from server.engines.decomposition_schema import Limits

# Real models by hub id, as model servers conventionally default: 7B on a GPU, the small siblings on a CPU.
DEFAULT_MODELS = {
    "gpu": ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"),
    "cpu": ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"),
}


def default_models(device: str) -> tuple[str, str]:
    """(verifier, decomposer) hub ids used when none is given."""
    return DEFAULT_MODELS["cpu" if device == "cpu" else "gpu"]


# ---- list settings: `a,b` and `["a", "b"]` both parse (environment and flags alike) ----------------
def parse_list(value: Any) -> Any:
    """A comma-separated string or a JSON list; pydantic-settings alone accepts only JSON."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"starts with '[' but is not a JSON list ({exc.msg}); or give a,b,c") from None
    return [part.strip() for part in text.split(",") if part.strip()]


StrList = Annotated[list[str], NoDecode, BeforeValidator(parse_list)]



class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DVREWARD_", extra="ignore")

    # models
    # Unset means "the device's default model"; an empty string means "none", which only the decomposer allows.
    verifier: str = Field("", description="verifier checkpoint: local dir or hub id (unset: by device)")
    decomposer: str | None = Field(
        None, description="decomposer checkpoint: local dir or hub id (unset: by device; empty string disables)"
    )
    pipeline: Literal["fast", "dsg"] = Field(defaults.PIPELINE, description="decomposition pipeline")
    decomposer_max_new_tokens: int = Field(
        1024, ge=1, description="longest decomposer output; a longer one is a failed decomposition, never cut short"
    )
    decomposer_max_semantic: int = Field(
        16, ge=1, le=64, description="most semantic questions per prompt; a list at the cap is reported"
    )
    decomposer_max_quality: int = Field(
        8, ge=0, le=64, description="most quality questions per prompt; a list at the cap is reported"
    )
    device: str = Field(defaults.DEVICE, description="torch device of the engines, e.g. cpu or cuda:0")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(defaults.DTYPE, description="engine dtype")
    verifier_mode: Literal["packed", "per_pair"] = Field(defaults.VERIFIER_MODE, description="verifier scoring layout")
    verifier_system_prompt: str = Field(
        VERIFIER_SYSTEM_PROMPT, description="system message of every verifier conversation (empty: none)"
    )
    verifier_system_prompt_file: Path | None = Field(
        None, description="read the verifier system prompt from this UTF-8 file instead"
    )
    min_pixels: int | None = Field(
        None, gt=0, description="smallest image area fed to the verifier (unset: the checkpoint's own)"
    )
    max_pixels: int | None = Field(
        None, gt=0, description="largest image area fed to the verifier (unset: the checkpoint's own)"
    )
    max_batch_tokens: int = Field(defaults.MAX_BATCH_TOKENS, description="token budget of one verifier forward pass")
    batched_vision: bool = Field(
        defaults.BATCHED_VISION, description="vision window attention in one call (same result, faster)"
    )

    # engines: which backend runs each role, and their options
    verifier_engine: Literal["transformers", "vllm", "openai"] = Field(
        "transformers", description="verifier backend: transformers, vllm (in the worker) or openai (a remote server)"
    )
    decomposer_engine: Literal["transformers", "vllm", "openai"] = Field(
        "transformers", description="decomposer backend: transformers, vllm (in the worker) or openai (a remote server)"
    )
    verifier_url: str | None = Field(
        None, description="openai engine: base URL of the verifier's server, ending in /v1; --verifier names the model"
    )
    decomposer_url: str | None = Field(
        None, description="openai engine: base URL of the decomposer's server, ending in /v1; --decomposer names "
        "the model"
    )
    verifier_api_key: str | None = Field(None, description="openai engine: Bearer key of the verifier's server")
    decomposer_api_key: str | None = Field(None, description="openai engine: Bearer key of the decomposer's server")
    verifier_tokenizer: str | None = Field(
        None, description="openai engine: local dir or hub id of the served verifier's tokenizer, for exact p "
        "(unset: the --verifier name, if it loads; else p from the top-20)"
    )
    verifier_exact_logprobs: bool = Field(
        True, description="openai engine: ask for logprob_token_ids (vLLM servers) so p is exact, not top-20"
    )
    remote_concurrency: int = Field(
        defaults.REMOTE_CONCURRENCY, ge=1, description="openai engine: most requests in flight per role"
    )
    remote_timeout_s: float = Field(
        defaults.REMOTE_TIMEOUT_S, gt=0, description="openai engine: timeout of one request"
    )
    remote_retries: int = Field(
        defaults.REMOTE_RETRIES, ge=0,
        description="openai engine: retries (backoff with jitter) on 429, 5xx and connection errors",
    )
    vllm_tensor_parallel_size: int = Field(
        defaults.VLLM_TENSOR_PARALLEL_SIZE, ge=1, description="vllm engine: GPUs one model is split over"
    )
    vllm_gpu_memory_utilization: float = Field(
        defaults.VLLM_GPU_MEMORY_UTILIZATION, gt=0, le=1,
        description="vllm engine: fraction of GPU memory per model (on a CPU: of RAM)",
    )
    vllm_max_model_len: int | None = Field(
        None, ge=1, description="vllm engine: longest sequence (unset: the model's own limit)"
    )

    # queue
    redis_url: str | None = Field(None, description="Redis URL; unset runs the embedded in-process queue")
    queue_prefix: str = Field("dvr", description="prefix of every Redis key")
    max_queue: int = Field(4096, description="queued verification items beyond which requests get 429")
    batch_size: int = Field(32, description="most items a worker takes into one batch")
    batch_wait_ms: int = Field(10, description="how long a worker waits to fill a batch")
    visibility_timeout_s: float = Field(60.0, description="a claimed task idle this long is re-delivered")
    max_deliveries: int = Field(3, description="deliveries after which a task fails with an error")
    result_ttl_s: int = Field(600, description="TTL of results, replies and idempotency records")
    cache_ttl_s: int = Field(7 * 24 * 3600, description="TTL of cached decompositions")
    heartbeat_s: float = Field(2.0, description="worker heartbeat period; a worker silent 3x this is dead")
    worker_metrics_port: int = Field(
        0, ge=0, le=65535, description="a worker's own port for Prometheus /metrics and /readyz, on --host (0: none); "
        "worker --devices gives its i-th worker this port + i"
    )

    # API
    host: str = Field("127.0.0.1", description="bind address (of the API, and of a worker's metrics port)")
    port: int = Field(8000, description="bind port")
    api_keys: StrList = Field(
        default_factory=list, description="accepted Bearer keys, comma-separated or a JSON list; empty = no auth"
    )
    request_timeout_s: float = Field(120.0, description="deadline of one request; past it the API answers 504")
    max_body_bytes: int = Field(64 * 1024 * 1024, description="largest request body")
    max_images: int = Field(512, description="most images in one request")
    max_image_bytes: int = Field(8 * 1024 * 1024, description="largest encoded image")
    max_image_pixels: int = Field(4096 * 4096, description="largest decoded image area (bombs are refused)")
    max_questions: int = Field(64, description="most questions per group")
    max_prompt_chars: int = Field(2000, description="longest prompt")
    max_groups: int = Field(128, description="most groups in one request")

    # bounds against slow clients, frozen dependencies, stuck engines and oversized items
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request whose headers or body do not fully arrive within this gets 408"
    )
    redis_timeout_s: float = Field(
        3.0, gt=0, description="a Redis command unanswered this long means Redis is down (503)"
    )
    batch_timeout_s: float = Field(
        600.0, gt=0, description="a batch the engine has not finished in this long marks the worker hung: it exits"
    )
    max_images_per_item: int = Field(2, ge=1, description="most images shown together in one /v1/verify item")
    public_verifier: str | None = Field(
        None, description="model name reported for the verifier (unset: its hub id, or a local dir's name)"
    )
    public_decomposer: str | None = Field(
        None, description="model name reported for the decomposer (unset: its hub id, or a local dir's name)"
    )

    @model_validator(mode="after")
    def _pixel_range(self) -> Settings:
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) is above max_pixels ({self.max_pixels})")
        return self

    @model_validator(mode="after")
    def _system_prompt_file(self) -> Settings:
        path = self.verifier_system_prompt_file
        if path is None:
            return self
        if "verifier_system_prompt" in self.model_fields_set:
            raise ValueError("give verifier_system_prompt or verifier_system_prompt_file, not both")
        self.verifier_system_prompt = read_system_prompt(path)
        return self

    @model_validator(mode="after")
    def _remote_urls(self) -> Settings:
        for role in ("verifier", "decomposer"):
            if getattr(self, f"{role}_engine") == "openai" and not getattr(self, f"{role}_url"):
                raise ValueError(f"{role}_engine openai needs {role}_url (the server's base URL, ending in /v1)")
        return self

    @model_validator(mode="after")
    def _default_models(self) -> Settings:
        verifier, decomposer = default_models(self.device)
        if "verifier" in self.model_fields_set and not self.verifier.strip():
            raise ValueError("the verifier cannot be empty (every score needs one); leave it unset for the "
                             "device's default model, or give a local directory or hub id")
        self.verifier = self.verifier or verifier
        if self.decomposer is None:
            self.decomposer = decomposer
        self.decomposer = self.decomposer or None
        return self


def setting_default(name: str) -> Any:
    """A setting's default: commands that run engines without the service (`decompose`, `score`, `eval`) use it too."""
    return Settings.model_fields[name].default


def decomposer_limits(settings: Settings | None = None) -> Limits:
    """The decomposer's question caps: the service's settings, or their defaults for commands without it."""
    from server.engines.decomposition_schema import Limits

    if settings is None:
        return Limits(max_semantic=setting_default("decomposer_max_semantic"),
                      max_quality=setting_default("decomposer_max_quality"))
    return Limits(max_semantic=settings.decomposer_max_semantic, max_quality=settings.decomposer_max_quality)


def setting_choices(name: str) -> list[str]:
    """The values a Literal setting takes, for a command's `choices`."""
    return [str(c) for c in typing.get_args(Settings.model_fields[name].annotation)]
