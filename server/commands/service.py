"""`dvreward serve | api | worker`: every flag is generated from a Settings field (and vice versa)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import types
import typing
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from server.preflight import StartupError, check, settings_problems
from server.settings import Settings, masked_url

if TYPE_CHECKING:
    from server.engines.base import Decomposer, Verifier

# Settings only one side acts on; the other command does not offer them as flags (the API reports the
# system prompt its workers report, its own only when no image was scored). `device` stays on both:
# the default models are chosen by device, and the API names the models in results and cache keys. The
# verifier's layout, pixel range and token budget are on both: the API refuses items they cannot hold.
WORKER_SETTINGS = {"batch_size", "batch_wait_ms", "heartbeat_s", "dtype", "decomposer_max_new_tokens",
                   "batched_vision", "verifier_system_prompt", "verifier_system_prompt_file", "decomposer_max_semantic",
                   "decomposer_max_quality", "batch_timeout_s"}
WORKER_SETTINGS |= {"verifier_engine", "decomposer_engine", "verifier_url", "decomposer_url", "verifier_api_key",
                    "decomposer_api_key", "verifier_tokenizer", "verifier_exact_logprobs", "remote_concurrency",
                    "remote_timeout_s", "remote_retries", "vllm_tensor_parallel_size", "vllm_gpu_memory_utilization",
                    "vllm_max_model_len"}
API_SETTINGS = {"host", "port", "api_keys", "allow_anonymous", "max_body_bytes", "max_images", "max_image_bytes",
                "max_questions", "max_prompt_chars", "max_groups", "request_timeout_s", "body_timeout_s",
                "max_images_per_item"}
API_SETTINGS |= {"idempotency_max_bytes", "cache_max_bytes"}


EXIT_HUNG = 3  # `dvreward worker` exit status when its engine hung (see DVREWARD_BATCH_TIMEOUT_S)
EXIT_WORKER_DIED = 4  # `dvreward worker` exit status when a loop of the worker failed otherwise


def loaded_models(s: Settings) -> dict[str, str | None]:
    """The checkpoints this process loads; a model on a remote server (openai engine) is the server's to check."""
    return {role: ref for role, ref, engine in (("verifier", s.verifier, s.verifier_engine),
                                                 ("decomposer", s.decomposer, s.decomposer_engine))
            if engine != "openai"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _arg_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return str, {"choices": list(typing.get_args(annotation))}
    if typing.get_origin(annotation) is list:
        return str, {"metavar": "A,B"}  # one value, comma-separated or JSON, parsed like the environment
    if annotation is bool:
        return _boolean, {"metavar": "{true,false}"}
    return annotation, {}


def _boolean(text: str) -> bool:
    """argparse's `type=bool` would read "false" as True."""
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def add_settings_flags(p: argparse.ArgumentParser, skip: set[str]) -> None:
    for name, field in Settings.model_fields.items():
        if name in skip:
            continue
        typ, extra = _arg_type(field.annotation)
        env = f"DVREWARD_{name.upper()}"
        default = shown_default(field.get_default(call_default_factory=True))
        p.add_argument(flag(name), dest=name, type=typ, default=None,
                       help=f"{field.description} (env {env}; default {default})", **extra)


def shown_default(default: Any) -> str:
    """A default as `--help` and the README's settings table show it."""
    if default is None or default == "":
        return "unset"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, list):
        return ",".join(map(str, default)) or "none"
    return str(default)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The settings flags given on the command line."""
    return {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}


def settings_from(args: argparse.Namespace) -> Settings:
    """Flags override the environment, which overrides the defaults; a bad value is one line, not a traceback."""
    try:
        return Settings(**_given(args))
    except ValidationError as exc:
        raise StartupError(settings_problems(exc)) from None


def _load_engines(s: Settings) -> tuple[Verifier, Decomposer | None]:
    """Loading errors (a corrupt checkpoint) are one line too."""
    from server.engines.base import EngineError
    from server.runtime import load_decomposer, load_verifier

    try:
        return load_verifier(s), load_decomposer(s)
    except EngineError as exc:
        raise StartupError([str(exc)]) from None


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api.protocol import with_header_deadline
    from server.runtime import build_app

    _logging()
    s = settings_from(args)
    check(s, models=loaded_models(s), listen=True, redis=True)
    app = build_app(s, _load_engines(s))
    queue = f"Redis at {masked_url(s.redis_url)}" if s.redis_url else "the embedded in-process queue"
    logging.getLogger("dvreward").info("serving on http://%s:%d with %s", s.host, s.port, queue)
    uvicorn.run(app, host=s.host, port=s.port, log_level="info", http=with_header_deadline(s.body_timeout_s))
    return 0


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api.protocol import with_header_deadline
    from server.runtime import build_app

    _logging()
    s = settings_from(args)
    if not s.redis_url:
        print("dvreward api needs --redis-url (or DVREWARD_REDIS_URL); for one process use `dvreward serve`",
              file=sys.stderr)
        return 2
    check(s, listen=True, redis=True)
    uvicorn.run(build_app(s, None), host=s.host, port=s.port, log_level="info",
                http=with_header_deadline(s.body_timeout_s))
    return 0


def _worker(args: argparse.Namespace) -> int:
    from server.runtime import build_broker, build_worker
    from server.worker import WorkerHung

    _logging()
    s = settings_from(args)
    if not s.redis_url:
        print("dvreward worker needs --redis-url (or DVREWARD_REDIS_URL)", file=sys.stderr)
        return 2
    if args.devices:
        return _supervise(args)
    check(s, models=loaded_models(s), redis=True)
    worker = build_worker(s, build_broker(s), *_load_engines(s))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log = logging.getLogger("dvreward")
        log.info("worker %s ready; SIGTERM drains and exits", worker.worker_id)
        died = False
        try:
            await worker.run(stop)
        except* WorkerHung:
            # The hung engine thread can be neither stopped nor joined (interpreter exit would wait for it).
            os._exit(EXIT_HUNG)
        except* Exception as failed:
            log.critical("worker %s stopped because a loop failed (%s); exiting with %d for a supervisor to restart "
                         "it", worker.worker_id, "; ".join(f"{type(e).__name__}: {e}" for e in failed.exceptions),
                         EXIT_WORKER_DIED, exc_info=failed)
            died = True
        finally:
            await worker.broker.close()
        if died:  # an engine thread may still run the abandoned batch, and interpreter exit would wait for it
            logging.shutdown()
            os._exit(EXIT_WORKER_DIED)

    asyncio.run(main())
    return 0


def _supervise(args: argparse.Namespace) -> int:
    """One worker process per device, each given the flags of this command (as environment)."""
    from server.supervisor import parse_devices, supervise

    if args.device is not None:
        raise StartupError(["give --device (one worker) or --devices (one per device), not both"])

    def gpu_count() -> int:
        import torch

        return torch.cuda.device_count()

    try:
        devices = parse_devices(args.devices, gpu_count)
    except ValueError as exc:
        raise StartupError([str(exc)]) from None
    given = _given(args)
    s = settings_from(argparse.Namespace(**given, device=devices[0]))  # default models depend on the device
    check(s, models=loaded_models(s), redis=True)  # before any child starts: exit 2, not a restart loop
    env = dict(os.environ)
    for name, value in given.items():
        env[f"DVREWARD_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return supervise(devices, env)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="API and worker in one process (embedded queue unless --redis-url)")
    add_settings_flags(p, set())
    p.set_defaults(func=_serve)
    p = sub.add_parser("api", help="the API alone, against Redis")
    add_settings_flags(p, WORKER_SETTINGS)
    p.set_defaults(func=_api)
    p = sub.add_parser("worker", help="a GPU/CPU worker, against Redis")
    add_settings_flags(p, API_SETTINGS)
    p.add_argument("--devices", help="one supervised worker process per device, restarted if it dies: all, GPU "
                   "indices (0,1,2,3), cuda:N or cpu (repeatable: cpu,cpu); instead of --device")
    p.set_defaults(func=_worker)
