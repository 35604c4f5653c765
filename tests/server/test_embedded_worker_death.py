"""`dvreward serve`'s embedded worker can die (a hung engine, a crashed loop): the process then says so on /healthz
and /readyz (503 with the reason) and exits non-zero for its supervisor, instead of answering 200 while every request
waits out its deadline."""

from __future__ import annotations

import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.api.app import create_app
from server.runtime import build_app, build_broker, build_service, build_worker, running, worker_hung
from server.settings import Settings
from tests.service_stack import drop_service_settings


class ClaimBug:
    """Fault injection: a broker whose claim has a bug (not an outage); everything else works."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def claim(self, *args: Any) -> Any:
        raise RuntimeError("claim bug")


def _dead(c: httpx.Client, says: str) -> None:
    for path in ("/healthz", "/readyz"):
        r = c.get(path)
        assert r.status_code == 503, (path, r.text)
        assert r.json()["error"]["code"] == "unavailable" and says in r.json()["error"]["message"], r.text
        assert float(r.headers["Retry-After"]) > 0


def test_a_hung_embedded_worker_turns_healthz_and_readyz_503(
    kit: types.SimpleNamespace, tiny_models: dict[str, Path], tiny_verifier: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 1 ms batch timeout makes the first batch 'hung'; /healthz stayed 200 and nothing told the process."""
    drop_service_settings(monkeypatch)
    s = Settings(verifier=str(tiny_models["verifier"]), decomposer="", batch_timeout_s=0.001, batch_wait_ms=0,
                 request_timeout_s=5)
    deaths: list[BaseException] = []
    body = {"items": [{"images": [kit.png_b64(1)], "questions": ["Is it red?"]}]}
    with kit.serve_in_thread(build_app(s, (tiny_verifier, None), on_worker_death=deaths.append)) as url, \
            httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(1) as pool:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        pending = pool.submit(c.post, "/v1/verify", json=body)  # its batch hangs the worker
        kit.wait_for(lambda: c.get("/healthz").status_code == 503, 30, "/healthz to say the worker died")
        _dead(c, "WorkerHung")
        assert pending.result(timeout=30).status_code >= 500
    assert len(deaths) == 1 and worker_hung(deaths[0]), deaths


def test_a_crashed_embedded_worker_loop_turns_healthz_and_readyz_503(
    kit: types.SimpleNamespace, tiny_models: dict[str, Path], tiny_verifier: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    drop_service_settings(monkeypatch)
    s = Settings(verifier=str(tiny_models["verifier"]), decomposer="")
    broker = ClaimBug(build_broker(s))
    worker = build_worker(s, broker, tiny_verifier, None)  # type: ignore[arg-type]
    deaths: list[BaseException] = []
    app = create_app(s, broker, build_service(s, broker), background=lambda died: running(worker, died),  # type: ignore[arg-type]
                     on_background_death=deaths.append)
    with kit.serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        kit.wait_for(lambda: c.get("/readyz").status_code == 503 and deaths, 30, "the crashed loop to be reported")
        _dead(c, "RuntimeError: claim bug")
    assert len(deaths) == 1 and not worker_hung(deaths[0])


def test_dvreward_serve_exits_with_status_3_when_its_worker_hangs(
    services: Callable[..., Any], tiny_models: dict[str, Path], kit: types.SimpleNamespace,
) -> None:
    """It kept serving /healthz with a dead worker; now it exits as `dvreward worker` does, for a restart."""
    env = kit.service_env(batch_timeout_s=0.001, batch_wait_ms=0, request_timeout_s=30,
                          verifier=tiny_models["verifier"], decomposer="")
    serve = services("serve-hung", "serve", env, http=True)
    serve.wait_http("/readyz")
    with pytest.raises(httpx.TransportError):  # the process goes away under the request
        httpx.post(serve.url + "/v1/verify", json={"items": [{"images": [kit.png_b64(1)], "questions": ["Red?"]}]},
                   timeout=60)
    assert serve.wait(30) == 3, serve.log_tail()
    assert "the embedded worker stopped" in serve.log_tail() and "engine is hung" in serve.log_tail()
