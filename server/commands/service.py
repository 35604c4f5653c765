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

from server.preflight import StartupError, check, claim_warning, settings_problems
from server.settings import Settings, masked_url

if TYPE_CHECKING:
    from server.engines.base import Decomposer, Verifier
    from server.worker_metrics import WorkerMetrics

# Settings only one side acts on; the other command does not offer them as flags. `device` stays on both:
# the default models are chosen by device, and the API names the models in results and cache keys. The
# verifier's layout, pixel range, token budget and system prompt are on both: the API refuses items they cannot
# hold (and reports its own system prompt when no image was scored). What changes the questions a decomposer
# writes (its engine, token limit and caps) is on both: it keys the cache. `host` too: the API listens on it, a
# worker serves its metrics port there.
WORKER_SETTINGS = {"batch_size", "batch_wait_ms", "heartbeat_s", "dtype", "batched_vision", "batch_timeout_s",
                   "worker_metrics_port"}
WORKER_SETTINGS |= {"verifier_engine", "verifier_url", "decomposer_url", "verifier_api_key",
                    "decomposer_api_key", "verifier_tokenizer", "verifier_exact_logprobs", "remote_concurrency",
                    "remote_timeout_s", "remote_retries", "vllm_tensor_parallel_size", "vllm_gpu_memory_utilization",
                    "vllm_max_model_len"}
API_SETTINGS = {"port", "api_keys", "allow_anonymous", "public_routes", "max_body_bytes", "max_inflight_requests",
                "max_inflight_bytes", "max_images", "max_image_bytes", "max_questions", "max_prompt_chars",
                "max_groups", "request_timeout_s", "body_timeout_s", "max_images_per_item", "worker_grace_s",
                "multipart_requests"}
API_SETTINGS |= {"idempotency_max_bytes", "cache_max_bytes"}


EXIT_HUNG = 3  # `dvreward worker` (and `serve`) exit status when its engine hung (see DVREWARD_BATCH_TIMEOUT_S)
EXIT_WORKER_DIED = 4  # `dvreward worker` (and `serve`) exit status when a loop of the worker failed otherwise


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


def _load_engines(s: Settings, metrics: WorkerMetrics) -> tuple[Verifier, Decomposer | None]:
    """Loading errors (a corrupt checkpoint) are one line too."""
    from server.engines.base import EngineError
    from server.paper import log_comparison
    from server.runtime import load_engines

    log_comparison(s.verifier, None if s.verifier_engine == "openai" else s.dtype, s.verifier_system_prompt)
    try:
        return load_engines(s, metrics)
    except EngineError as exc:
        raise StartupError([str(exc)]) from None


def _metrics_ports(s: Settings, ports: list[int]) -> list[tuple[str, int, str]]:
    """The workers' metrics ports to check before anything loads (0: none)."""
    return [(s.host, port, "--worker-metrics-port") for port in ports if port]


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _warn_of_claims(s: Settings) -> None:
    """For a worker on Redis (the embedded queue never re-delivers)."""
    warning = claim_warning(s) if s.redis_url else None
    if warning:
        logging.getLogger("dvreward").warning("%s", warning)


def _serve(args: argparse.Namespace) -> int:
    """API and worker in one process: if the worker dies, so does the process (non-zero, for a supervisor to restart
    it), rather than answer /healthz while every request times out."""
    import uvicorn

    from server.api.protocol import with_header_deadline
    from server.runtime import build_app, worker_hung
    from server.worker_metrics import WorkerMetrics

    _logging()
    s = settings_from(args)
    check(s, models=loaded_models(s), api=True, redis=True,
          listen=[(s.host, s.port, "--port"), *_metrics_ports(s, [s.worker_metrics_port])])
    _warn_of_claims(s)
    status = 0

    def worker_died(exc: BaseException) -> None:
        nonlocal status
        if worker_hung(exc):  # its engine thread can be neither stopped nor joined (interpreter exit would wait)
            os._exit(EXIT_HUNG)
        status = EXIT_WORKER_DIED
        server.should_exit = server.force_exit = True  # now: requests in flight would wait out their deadlines

    metrics = WorkerMetrics(s.device)
    app = build_app(s, _load_engines(s, metrics), metrics, on_worker_death=worker_died)
    server = uvicorn.Server(uvicorn.Config(app, host=s.host, port=s.port, log_level="info",
                                           http=with_header_deadline(s.body_timeout_s)))
    queue = f"Redis at {masked_url(s.redis_url)}" if s.redis_url else "the embedded in-process queue"
    logging.getLogger("dvreward").info("serving on http://%s:%d with %s", s.host, s.port, queue)
    server.run()
    return status if server.started else 1


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
    check(s, listen=[(s.host, s.port, "--port")], api=True, redis=True)
    uvicorn.run(build_app(s, None), host=s.host, port=s.port, log_level="info",
                http=with_header_deadline(s.body_timeout_s))
    return 0


def _worker(args: argparse.Namespace) -> int:
    from server.runtime import build_broker, build_worker, worker_port
    from server.worker import WorkerHung, death_reason
    from server.worker_metrics import WorkerMetrics

    _logging()
    s = settings_from(args)
    if not s.redis_url:
        print("dvreward worker needs --redis-url (or DVREWARD_REDIS_URL)", file=sys.stderr)
        return 2
    if args.devices:
        return _supervise(args)
    check(s, models=loaded_models(s), listen=_metrics_ports(s, [s.worker_metrics_port]), redis=True)
    _warn_of_claims(s)
    metrics = WorkerMetrics(s.device)
    broker = build_broker(s)
    worker = build_worker(s, broker, *_load_engines(s, metrics), metrics=metrics)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log = logging.getLogger("dvreward")
        log.info("worker %s ready; SIGTERM drains and exits", worker.worker_id)
        died = False
        try:
            async with worker_port(worker, s):
                await worker.run(stop)
        except* WorkerHung:
            # The hung engine thread can be neither stopped nor joined (interpreter exit would wait for it).
            os._exit(EXIT_HUNG)
        except* Exception as failed:
            log.critical("worker %s stopped because a loop failed (%s); exiting with %d for a supervisor to restart "
                         "it", worker.worker_id, death_reason(failed), EXIT_WORKER_DIED, exc_info=failed)
            died = True
        finally:
            await broker.close()
        if died:  # an engine thread may still run the abandoned batch, and interpreter exit would wait for it
            logging.shutdown()
            os._exit(EXIT_WORKER_DIED)

    asyncio.run(main())
    return 0


def _supervise(args: argparse.Namespace) -> int:
    """One worker process per device, each given the flags of this command (as environment)."""
    from server.supervisor import parse_devices, supervise, worker_ports

    if args.device is not None:
        raise StartupError(["give --device (one worker) or --devices (one per device), not both"])

    def gpu_count() -> int:
        import torch

        return torch.cuda.device_count()

    given = _given(args)
    try:
        devices = parse_devices(args.devices, gpu_count)
        s = settings_from(argparse.Namespace(**given, device=devices[0]))  # default models depend on the device
        ports = worker_ports(s.worker_metrics_port, len(devices))
    except ValueError as exc:
        raise StartupError([str(exc)]) from None
    # before any child starts: a bad reference, a busy port or no Redis is exit 2, not a restart loop
    check(s, models=loaded_models(s), listen=_metrics_ports(s, ports), redis=True)
    env = dict(os.environ)
    for name, value in given.items():
        env[f"DVREWARD_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return supervise(devices, env, ports)


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
