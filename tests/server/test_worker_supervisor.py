"""`dvreward worker --devices`: device parsing, and on CPU over real Redis two supervised worker processes,
each on its own metrics port, one SIGKILLed while it holds tasks: it is restarted on the same port, its tasks
are re-claimed, nothing is lost."""

from __future__ import annotations

import os
import re
import signal
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from server.preflight import port_problem
from server.supervisor import child_environment, parse_devices, worker_ports
from tests.tolerance import assert_rewards_close

QUESTIONS = [{"id": "cat", "text": "Is there a cat?", "tag": "Existence"},
             {"id": "red", "text": "Is the cat red?", "tag": "Attribute", "depends_on": ["cat"]}]


def test_devices_parse() -> None:
    assert parse_devices("0,1", lambda: 0) == ["cuda:0", "cuda:1"]
    assert parse_devices("all", lambda: 3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert parse_devices("cpu,cpu", lambda: 0) == ["cpu", "cpu"]
    assert parse_devices(" cuda:2 ", lambda: 0) == ["cuda:2"]
    for bad, says in (("all", "no GPU"), ("", "at least one"), ("gpu0", "not a GPU index")):
        with pytest.raises(ValueError, match=says):
            parse_devices(bad, lambda: 0)


def test_each_worker_gets_its_own_metrics_port() -> None:
    assert worker_ports(9188, 3) == [9188, 9189, 9190]
    assert worker_ports(0, 2) == [0, 0], "0: no metrics port for any"
    with pytest.raises(ValueError, match="past 65535"):
        worker_ports(65535, 2)


def metrics_pid(port: int) -> int | None:
    """The pid in the worker id that the worker on `port` reports, or None while its port is closed."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.TransportError:
        return None
    found = re.search(r'dvreward_worker_info\{[^}]*worker_id="[^"]*-(\d+)-[0-9a-f]+"', text)
    assert found, text
    return int(found.group(1))


def test_each_gpu_worker_sees_only_its_gpu() -> None:
    assert child_environment("cuda:1", {}) == ({"CUDA_VISIBLE_DEVICES": "1"}, "cuda")
    assert child_environment("cuda:1", {"CUDA_VISIBLE_DEVICES": "4,6"})[0]["CUDA_VISIBLE_DEVICES"] == "6"
    assert child_environment("cpu", {"A": "b"}) == ({"A": "b"}, "cpu")
    with pytest.raises(ValueError, match="shows 2 GPUs"):
        child_environment("cuda:2", {"CUDA_VISIBLE_DEVICES": "4,6"})


def children(supervisor_pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == supervisor_pid:
            found.add(int(stat.parent.name))
    return found


def registered_pids(api_url: str) -> set[int]:
    r = httpx.get(api_url + "/v1/models", timeout=5)
    assert r.status_code == 200, r.text
    return {int(w["worker_id"].rsplit("-", 2)[1]) for w in r.json()["workers"]}


def pending_total(client: redis.Redis) -> int:
    try:
        return int(client.xpending("dvr:stream:verify", "workers")["pending"])
    except redis.ResponseError:  # the group does not exist yet
        return 0


def test_supervisor_restarts_a_killed_worker_and_nothing_is_lost(
    redis_url: str, services: Callable[..., Any], tiny_models: dict[str, Path], tiny_verifier: Any,
    kit: types.SimpleNamespace, request: pytest.FixtureRequest,
) -> None:
    common = dict(redis_url=redis_url, visibility_timeout_s=3, heartbeat_s=0.9, request_timeout_s=120)
    api = services("api", "api", kit.service_env(**common), http=True)
    base = kit.free_port()
    while base == 65535 or port_problem("127.0.0.1", base + 1) is not None:  # the supervisor takes base and base + 1
        base = kit.free_port()
    ports = [base, base + 1]
    sup = services("supervisor", "worker", kit.service_env(**common, batch_size=2, batch_wait_ms=5),
                   "--devices", "cpu,cpu", "--verifier", str(tiny_models["verifier"]), "--decomposer", "",
                   "--worker-metrics-port", str(base))
    api.wait_http("/healthz")

    def both_up() -> set[int] | None:
        assert sup.alive(), sup.log_tail()
        kids = children(sup.pid)
        served = {metrics_pid(port) for port in ports}
        return kids if len(kids) == 2 and registered_pids(api.url) == kids == served else None

    first, second = sorted(kit.wait_for(both_up, kit.STARTUP_S, "two supervised workers to register", 0.2))
    by_pid = {metrics_pid(port): port for port in ports}

    n_requests, n_images = 6, 4
    images = [[kit.png_bytes(100 + 10 * r + i, (64, 64)) for i in range(n_images)] for r in range(n_requests)]

    def post(r: int) -> httpx.Response:
        body = {"groups": [{"questions": QUESTIONS, "images": [kit.b64(b) for b in images[r]]}]}
        return httpx.post(api.url + "/v1/score", json=body, timeout=150)

    client = redis.Redis.from_url(redis_url)
    request.addfinalizer(client.close)
    kit.wait_for(lambda: pending_total(client) == 0, 10, "an idle queue")
    os.kill(second, signal.SIGSTOP)  # only `first` claims, so the tasks held at the kill are its own
    try:
        time.sleep(0.3)  # the stopped worker's blocking read (batch_wait_ms=5) expires in Redis
        with ThreadPoolExecutor(n_requests) as pool:
            futures = [pool.submit(post, r) for r in range(n_requests)]
            kit.wait_for(lambda: pending_total(client) > 0, 60, "the first worker to claim tasks", 0.002)
            os.kill(first, signal.SIGKILL)
            held = pending_total(client)
            os.kill(second, signal.SIGCONT)
            responses = [f.result(timeout=150) for f in futures]
    finally:
        os.kill(second, signal.SIGCONT)

    assert held > 0
    for r, resp in enumerate(responses):
        assert resp.status_code == 200, resp.text
        (group,) = resp.json()["groups"]
        assert_rewards_close([group["rewards"]], [kit.local_rewards(tiny_verifier, images[r], QUESTIONS)])
    assert pending_total(client) == 0 and client.xlen("dvr:stream:verify") == 0

    def restarted() -> set[int] | None:
        kids = both_up()
        return kids if kids and first not in kids and second in kids else None

    (reborn,) = kit.wait_for(restarted, kit.STARTUP_S, "the killed worker to be restarted and registered", 0.2) \
        - {second}
    assert "restarting" in sup.log_tail(50_000)
    assert metrics_pid(by_pid[first]) == reborn and metrics_pid(by_pid[second]) == second, "each keeps its port"

    sup.signal(signal.SIGTERM)
    assert sup.wait(60) == 0, sup.log_tail()
    assert registered_pids(api.url) == set(), "drained workers deregister"
    assert "Traceback" not in sup.log_tail(50_000)
