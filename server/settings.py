"""All service settings: one pydantic-settings class, environment prefix DVREWARD_.

Every CLI flag of `dvreward serve|api|worker` maps onto a field here, so a deployment can be
configured entirely by environment (docker-compose) or entirely by flags.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.engines import defaults
from server.engines.prompts import VERIFIER_SYSTEM_PROMPT, read_system_prompt

if TYPE_CHECKING:
    from server.engines.decomposition.schema import Limits

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
    """A comma-separated string or a JSON list; pydantic-settings alone accepts only JSON. An empty or blank
    string is the empty list; empty entries are kept, for `no_empty_entries` to refuse."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"starts with '[' but is not a JSON list ({exc.msg}); or give a,b,c") from None
    return [part.strip() for part in text.split(",")] if text else []


def no_empty_entries(values: list[str]) -> list[str]:
    """`,` or `a,${UNSET}` would otherwise be read as fewer entries, or none (for API keys: no authentication)."""
    blank = [i for i, v in enumerate(values) if not v.strip()]
    if blank:
        raise ValueError(f"entry {blank[0] + 1} of {len(values)} is empty (a stray comma, or an unset variable?); "
                         "give every entry, or leave the whole setting unset")
    return [v.strip() for v in values]


StrList = Annotated[list[str], NoDecode, BeforeValidator(parse_list), AfterValidator(no_empty_entries)]


def paths(values: list[str]) -> list[str]:
    """Routes are named by path: `healthz` would match nothing, and close the probes without a word."""
    wrong = [v for v in values if not v.startswith("/")]
    if wrong:
        raise ValueError(f"{wrong[0]!r} is not a path: give paths such as /healthz")
    return values


# Probes, metrics and the API's documentation: what answers without a key unless public_routes says otherwise.
PUBLIC_ROUTES = ("/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json")

# Durations are positive and at most a year: a longer one is a unit slip (milliseconds given as seconds).
YEAR_S = 365 * 24 * 3600
MIB, GIB = 1024**2, 1024**3


def redis_url_problem(url: str) -> str | None:
    """What makes `url` unusable as a Redis URL (redis-py would fail at the first command, or silently pick
    defaults), or None. The URL in the message has its password masked."""
    from redis.connection import parse_url

    shown = masked_url(url)
    hint = "e.g. redis://127.0.0.1:6379/0, rediss://:PASSWORD@HOST:6380/0 or unix:///run/redis.sock"
    try:
        parse_url(url)
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{shown!r} is not a Redis URL ({exc}); {hint}"
    if parts.scheme.lower() == "unix":
        return None if parts.path else f"{shown!r} names no socket path; {hint}"
    if not parts.hostname:
        return f"{shown!r} names no host; {hint}"
    if port == 0:
        return f"{shown!r}: port 0 is not a port Redis listens on; {hint}"
    if parts.path.strip("/") and not parts.path.strip("/").isdigit():
        return f"{shown!r}: the path must be a database number (/0), not {parts.path!r}; {hint}"
    return None


def masked_url(url: str) -> str:
    """The URL with its password replaced by ***, so that it can be printed and logged."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class Settings(BaseSettings):
    # Infinity and NaN pass every bound they are compared with (or none), so no setting takes them.
    model_config = SettingsConfigDict(env_prefix="DVREWARD_", extra="ignore", allow_inf_nan=False)

    # models
    # Unset means "the device's default model"; an empty string means "none", which only the decomposer allows.
    verifier: str = Field(
        "", description="verifier checkpoint: local dir or hub id (unset: the device's default; empty is refused)"
    )
    decomposer: str | None = Field(
        None, description="decomposer checkpoint: local dir or hub id (unset: the device's default; empty: none, "
        "requests give their questions)"
    )
    pipeline: Literal["fast", "dsg"] = Field(defaults.PIPELINE, description="decomposition pipeline")
    decomposer_max_new_tokens: int = Field(
        1024, ge=1, description="longest decomposer output; a longer one is a failed decomposition, never cut short"
    )
    decomposer_max_semantic: int = Field(
        16, ge=1, le=64, description="most semantic questions per prompt; a list at the cap is reported in `warnings`"
    )
    decomposer_max_quality: int = Field(
        8, ge=0, le=64, description="most quality questions per prompt; a list at the cap is reported in `warnings`"
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
    max_batch_tokens: int = Field(
        defaults.MAX_BATCH_TOKENS, ge=1, description="token budget of one verifier forward pass"
    )
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
        defaults.REMOTE_TIMEOUT_S, gt=0, le=YEAR_S, description="openai engine: timeout of one request"
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
    redis_url: str | None = Field(
        None, description="Redis URL (redis://, rediss:// or unix://), which must answer at startup; unset runs the "
        "embedded in-process queue"
    )
    queue_prefix: str = Field("dvr", min_length=1, description="prefix of every Redis key")
    max_queue: int = Field(4096, ge=1, description="queued verification items beyond which requests get 429")
    batch_size: int = Field(32, ge=1, description="most items a worker takes into one batch")
    batch_wait_ms: int = Field(
        10, ge=0, description="how long a worker waits to fill a batch; shorter than the batch timeout"
    )
    visibility_timeout_s: float = Field(
        60.0, gt=0, le=YEAR_S,
        description="a claimed task idle this long is re-delivered; above 3 heartbeats + the batch wait",
    )
    max_deliveries: int = Field(3, ge=1, description="deliveries after which a task fails with an error")
    result_ttl_s: int = Field(600, ge=1, le=YEAR_S, description="TTL of results, replies and idempotency records")
    cache_ttl_s: int = Field(7 * 24 * 3600, ge=1, le=YEAR_S, description="TTL of cached decompositions")
    idempotency_max_bytes: int = Field(
        4 * MIB, ge=1024, le=GIB, description="largest response kept for Idempotency-Key replays (echoed group "
        "metadata not counted: the retry brings it again); a larger one is answered but not kept, so its retry is "
        "scored again"
    )
    cache_max_bytes: int = Field(
        256 * MIB, ge=MIB, le=1024 * GIB, description="embedded queue: bytes of cached decompositions and idempotency "
        "records held in memory, the oldest dropped first (with Redis, its maxmemory bounds them); at least "
        "idempotency_max_bytes"
    )
    lock_ttl_s: float = Field(
        10.0, ge=1, le=YEAR_S, description="how long the lock of a computation shared by identical requests (a "
        "decomposition, an Idempotency-Key) outlives an API that died computing it: a retry takes over within this; "
        "renewed while computing; at least 2 x redis_timeout_s"
    )
    heartbeat_s: float = Field(
        2.0, ge=0.1, le=YEAR_S, description="worker heartbeat period; a worker silent 3x this is dead"
    )
    worker_grace_s: float = Field(
        10.0, gt=0, le=YEAR_S, description="no live worker for a kind of task this long: requests needing one get "
        "503 at once, and queued ones stop waiting, instead of 504 at their deadline"
    )
    worker_metrics_port: int = Field(
        0, ge=0, le=65535, description="a worker's own port for Prometheus /metrics and /readyz, on --host (0: none); "
        "worker --devices gives its i-th worker this port + i"
    )

    # API
    host: str = Field("127.0.0.1", min_length=1,
                      description="bind address (of the API, and of a worker's metrics port)")
    port: int = Field(8000, ge=1, le=65535, description="bind port")
    api_keys: StrList = Field(
        default_factory=list, description="accepted Bearer keys, comma-separated or a JSON list (no empty entry); "
        "none: no authentication, which a non-loopback --host refuses unless allow_anonymous"
    )
    allow_anonymous: bool = Field(
        False, description="serve without API keys on a non-loopback --host (anyone who reaches it may score)"
    )
    public_routes: Annotated[StrList, AfterValidator(paths)] = Field(
        default_factory=lambda: list(PUBLIC_ROUTES), description="paths (with what is under them) that answer "
        "without a key when api_keys are set; empty: every route needs one (probes then send it too)"
    )
    request_timeout_s: float = Field(
        120.0, gt=0, le=YEAR_S, description="deadline of one request; past it the API answers 504"
    )
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1, description="largest request body")
    multipart_requests: bool = Field(
        True, description="/v1/score and /v1/verify take multipart/form-data bodies too (images as binary parts, "
        "no base64), as Accept-Post on GET /v1/models tells clients; false: JSON only, as servers before it"
    )
    max_inflight_requests: int = Field(
        64, ge=1, description="requests with a body the API holds at once (reading, decoding or waiting for "
        "workers); one more gets 429 before its body is read"
    )
    max_inflight_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="body bytes the API holds at once over all requests; a body that "
        "would pass them gets 429 before it is read; at least max_body_bytes"
    )
    max_images: int = Field(512, ge=1, description="most images in one request")
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1, description="largest encoded image")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="largest decoded image area (bombs are refused)")
    max_questions: int = Field(64, ge=1, description="most questions per group")
    max_prompt_chars: int = Field(2000, ge=1, description="longest prompt")
    max_groups: int = Field(128, ge=1, description="most groups in one request")

    # bounds against slow clients, frozen dependencies, stuck engines and oversized items
    body_timeout_s: float = Field(
        30.0, gt=0, le=YEAR_S, description="a request whose headers or body do not fully arrive within this gets 408"
    )
    redis_timeout_s: float = Field(
        3.0, gt=0, le=YEAR_S, description="a Redis command unanswered this long means Redis is down (503)"
    )
    redis_max_connections: int = Field(
        256, ge=4, le=65536, description="connections one process opens to Redis at most, each request's blocking "
        "wait for results included; a command finding none free within redis_timeout_s is a 503; above "
        "max_inflight_requests"
    )
    batch_timeout_s: float = Field(
        600.0, gt=0, le=YEAR_S,
        description="a batch the engine has not finished in this long marks the worker hung: it exits",
    )
    max_images_per_item: int = Field(2, ge=1, description="most images shown together in one /v1/verify item")
    public_verifier: str | None = Field(
        None, description="model name reported for the verifier (unset: its hub id, or a local dir's name)"
    )
    public_decomposer: str | None = Field(
        None, description="model name reported for the decomposer (unset: its hub id, or a local dir's name)"
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url_form(cls, url: str | None) -> str | None:
        problem = redis_url_problem(url) if url else None
        if problem:
            raise ValueError(problem)
        return url

    @model_validator(mode="after")
    def _claims_outlive_renewals(self) -> Settings:
        """A claimed task is renewed every heartbeat once its batch runs, not while the batch is being filled:
        its claim must outlast the batch wait and two missed renewals, or another worker takes it too."""
        wait = self.batch_wait_ms / 1000
        if self.visibility_timeout_s <= 3 * self.heartbeat_s + wait:
            raise ValueError(f"visibility_timeout_s ({self.visibility_timeout_s:g}) must exceed 3 x heartbeat_s "
                             f"+ batch_wait_ms ({3 * self.heartbeat_s:g} s + {wait:g} s): a claimed task would be "
                             "re-delivered to another worker while this one still works on it")
        if wait >= self.batch_timeout_s:
            raise ValueError(f"batch_wait_ms ({self.batch_wait_ms}) must be shorter than batch_timeout_s "
                             f"({self.batch_timeout_s:g}): a stopping worker may wait that long for the last tasks "
                             "of a batch, and stops within its batch timeout")
        return self

    @model_validator(mode="after")
    def _inflight_bounds(self) -> Settings:
        if self.max_inflight_bytes < self.max_body_bytes:
            raise ValueError(f"max_inflight_bytes ({self.max_inflight_bytes}) is below max_body_bytes "
                             f"({self.max_body_bytes}): a body within the limit could never be admitted")
        if self.redis_max_connections <= self.max_inflight_requests:
            raise ValueError(f"redis_max_connections ({self.redis_max_connections}) must exceed max_inflight_requests "
                             f"({self.max_inflight_requests}): each request in flight may hold one while it waits for "
                             "its results, and submitting needs another")
        return self

    @model_validator(mode="after")
    def _shared_state_bounds(self) -> Settings:
        if self.lock_ttl_s < 2 * self.redis_timeout_s:
            raise ValueError(f"lock_ttl_s ({self.lock_ttl_s:g}) must be at least 2 x redis_timeout_s "
                             f"({2 * self.redis_timeout_s:g} s): a computing API renews its lock every third of it, "
                             "and a renewal may take that long, so the lock would lapse under a live computation")
        if self.cache_max_bytes < self.idempotency_max_bytes:
            raise ValueError(f"cache_max_bytes ({self.cache_max_bytes}) is below idempotency_max_bytes "
                             f"({self.idempotency_max_bytes}): a record within the limit might never be kept")
        return self

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
    from server.engines.decomposition.schema import Limits

    if settings is None:
        return Limits(max_semantic=setting_default("decomposer_max_semantic"),
                      max_quality=setting_default("decomposer_max_quality"))
    return Limits(max_semantic=settings.decomposer_max_semantic, max_quality=settings.decomposer_max_quality)


def setting_choices(name: str) -> list[str]:
    """The values a Literal setting takes, for a command's `choices`."""
    return [str(c) for c in typing.get_args(Settings.model_fields[name].annotation)]
