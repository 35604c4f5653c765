"""The one way tests start things: a private real Redis, `dvreward` service processes, free ports.

Loaded as a plugin by tests/conftest.py (fixtures `redis_server`, `redis_url`, `services`) and imported
by name for its helpers. Service processes see no DVREWARD_ setting of the environment that runs the
tests, only the ones a test gives; every process is stopped by its own pid in teardown, and all
traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

REDIS_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"
HOST = "127.0.0.1"
STARTUP_S = 150.0  # bound on a service process loading tiny models on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---- Redis -------------------------------------------------------------------------------------
class RedisProcess:
    """A private redis-server without persistence, on its own port, in its own directory."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = open(self.workdir / f"redis-{self.starts}.log", "wb")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        import redis

        client = redis.Redis(host=HOST, port=self.port, socket_connect_timeout=0.5)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"redis-server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_for(up, 15, f"redis-server on port {self.port}")
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: the server vanishes the way a crashed or OOM-killed Redis does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def log_tail(self) -> str:
        logs = sorted(self.workdir.glob("redis-*.log"))
        return logs[-1].read_text(errors="replace")[-2000:] if logs else ""


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    if not os.path.exists(REDIS_BIN):
        pytest.skip(
            f"!!! REDIS TESTS SKIPPED: no redis-server binary at {REDIS_BIN}. Install it (apt-get install "
            "redis-server) so the Redis broker and the multi-process service are tested against a real Redis."
        )
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def private_redis(tmp_path: Path, redis_server: RedisProcess) -> Iterator[RedisProcess]:
    """A Redis of one test alone, which it may freeze or kill; depends on redis_server only for the skip."""
    server = RedisProcess(tmp_path / "private-redis")
    server.start()
    yield server
    server.kill()  # SIGKILL ends a frozen (SIGSTOPped) server too


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """The shared private Redis, flushed before each test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


# ---- service processes -------------------------------------------------------------------------
def drop_service_settings(mp: pytest.MonkeyPatch) -> None:
    """No DVREWARD_ variable for this test: in-process Settings see the defaults, as service_env's processes do."""
    for name in [k for k in os.environ if k.startswith("DVREWARD_")]:
        mp.delenv(name)


def service_env(**settings: Any) -> dict[str, str]:
    """The parent environment without any DVREWARD_ setting, plus the given ones, offline; one thread unless
    TEST_SERVICE_THREADS says otherwise (.ci/run changes it to vary the float reduction order)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVREWARD_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=os.environ.get("TEST_SERVICE_THREADS", "1"), TOKENIZERS_PARALLELISM="false")
    for key, value in settings.items():
        env[f"DVREWARD_{key.upper()}"] = str(value)
    return env


class ServiceProcess:
    """`dvreward <command> ...` in its own session, logging to a file; stopped by pid in teardown."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logdir: Path, port: int | None = None,
                 cwd: Path | None = None):
        self.name = name
        self.args = args
        self.env = env
        self.log_path = logdir / f"{name}.log"
        self.port = port
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        assert self.port is not None
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServiceProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", *self.args], env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, cwd=self.cwd,
        )
        log.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def wait_http(self, path: str, status: int = 200, timeout: float = STARTUP_S) -> None:
        def ready() -> bool:
            if not self.alive():
                pytest.fail(f"{self.name} exited with {self.proc and self.proc.returncode}:\n{self.log_tail()}")
            try:
                return httpx.get(self.url + path, timeout=2.0).status_code == status
            except httpx.TransportError:
                return False

        wait_for(ready, timeout, f"{self.name} to answer {path} with {status}", interval=0.2)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not exit within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Factory of service processes for one test; all are stopped in teardown."""
    started: list[ServiceProcess] = []

    def make(name: str, command: str, env: dict[str, str], *flags: str, http: bool = False) -> ServiceProcess:
        port = free_port() if http else None
        args = [command, *flags] + (["--host", HOST, "--port", str(port)] if http else [])
        proc = ServiceProcess(name, args, env, tmp_path, port)
        started.append(proc)
        return proc.start()

    yield make
    for proc in reversed(started):
        proc.stop()


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """A real uvicorn server on a free port in a background thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 30, "the in-thread uvicorn server")
        assert thread.is_alive(), "the in-thread uvicorn server failed to start"
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the in-thread uvicorn server did not shut down"
