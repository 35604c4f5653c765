"""Many machines, for real: network namespaces stand in for hosts. Redis (with a password) and the API
live in one, two workers in two others, each linked to the first by its own veth pair; addresses exist
only inside the namespaces. One worker's link is cut while it holds tasks: the other re-claims them and
nothing is lost; the link comes back and the worker rejoins. Every namespace is deleted, even on failure.

Needs root and `ip` (iproute2); skipped loudly otherwise.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.tolerance import assert_rewards_close

IP = shutil.which("ip")
CLONE_NEWNET = 0x40000000
PASSWORD = "s3cret-" + secrets.token_hex(4)
REDIS_PORT, API_PORT = 6390, 8090  # inside the namespaces: nothing else listens there
QUESTIONS = [{"id": "cat", "text": "Is there a cat?", "tag": "Existence"},
             {"id": "red", "text": "Is the cat red?", "tag": "Attribute", "depends_on": ["cat"]}]

pytestmark = pytest.mark.timeout(420)


def _skip_unless_able() -> None:
    why = ("not root" if os.geteuid() != 0 else "no `ip` command (iproute2)" if IP is None
           else "no redis-server" if shutil.which("redis-server") is None else "")
    if why:
        pytest.skip(f"!!! MULTI-HOST TEST SKIPPED: {why}. It needs root, iproute2 and redis-server to build "
                    "network namespaces; CI runs as root.")


class Hosts:
    """Namespaces `hub`, `w1`, `w2`; `wN` reaches the hub at 10.254.N.1 over its own veth pair."""

    def __init__(self, logdir: Path) -> None:
        tag = secrets.token_hex(3)
        self.ns = {role: f"dvr-{tag}-{role}" for role in ("hub", "w1", "w2")}
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def ip(self, *args: str) -> None:
        assert IP is not None
        out = subprocess.run([IP, *args], capture_output=True, text=True, timeout=20)
        if out.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")

    def up(self) -> None:
        for name in self.ns.values():
            self.ip("netns", "add", name)
            self.ip("-n", name, "link", "set", "lo", "up")
        for n in (1, 2):
            worker, hub, end = self.ns[f"w{n}"], f"{self.ns['hub'][:9]}h{n}", f"{self.ns['hub'][:9]}w{n}"
            self.ip("link", "add", hub, "type", "veth", "peer", "name", end)
            self.ip("link", "set", hub, "netns", self.ns["hub"])
            self.ip("link", "set", end, "netns", worker)
            self.ip("-n", self.ns["hub"], "addr", "add", f"10.254.{n}.1/30", "dev", hub)
            self.ip("-n", worker, "addr", "add", f"10.254.{n}.2/30", "dev", end)
            self.ip("-n", self.ns["hub"], "link", "set", hub, "up")
            self.ip("-n", worker, "link", "set", end, "up")

    def link(self, n: int, state: str) -> None:
        self.ip("-n", self.ns[f"w{n}"], "link", "set", f"{self.ns['hub'][:9]}w{n}", state)

    def start(self, role: str, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """`ip netns exec` execs the command, so the pid is the process itself."""
        assert IP is not None
        with open(self.logdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([IP, "netns", "exec", self.ns[role], *argv], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def down(self) -> list[str]:
        """Kill what was started (by pid), delete every namespace (their veths go with them)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(timeout=10)
        problems = []
        for name in self.ns.values():
            if Path(f"/run/netns/{name}").exists():
                try:
                    self.ip("netns", "del", name)
                except RuntimeError as exc:
                    problems.append(str(exc))
        return problems


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    _skip_unless_able()
    h = Hosts(tmp_path)
    try:
        h.up()
    except RuntimeError as exc:
        h.down()
        pytest.skip(f"!!! MULTI-HOST TEST SKIPPED: cannot build network namespaces here ({exc})")
    try:
        yield h
    finally:
        problems = h.down()
        left = [n for n in h.ns.values() if Path(f"/run/netns/{n}").exists()]
        assert not problems and not left, f"namespaces left behind: {left} {problems}"


def in_namespace(name: str) -> Callable[[], None]:
    """Thread initializer: sockets this thread opens live in namespace `name` (setns is per thread)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def enter() -> None:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {name}")
        finally:
            os.close(fd)

    return enter


def test_workers_on_other_hosts_survive_a_cut_link(
    hosts: Hosts, tiny_models: dict[str, Path], tiny_verifier: Any, kit: types.SimpleNamespace,
) -> None:
    hub = ThreadPoolExecutor(8, initializer=in_namespace(hosts.ns["hub"]), thread_name_prefix="hub")
    on_hub = lambda fn, *a: hub.submit(fn, *a).result(timeout=200)  # noqa: E731 - a one-line helper
    try:
        hosts.start("hub", "redis", [shutil.which("redis-server") or "redis-server", "--port", str(REDIS_PORT),
                                     "--bind", "127.0.0.1", "10.254.1.1", "10.254.2.1", "--requirepass", PASSWORD,
                                     "--save", "", "--appendonly", "no", "--dir", str(hosts.logdir)], os.environ.copy())

        def redis_client(password: str | None = PASSWORD) -> redis.Redis:
            return redis.Redis(host="127.0.0.1", port=REDIS_PORT, password=password, socket_timeout=2)

        def ping() -> bool:
            try:
                return bool(redis_client().ping())
            except redis.ConnectionError:
                return False

        kit.wait_for(lambda: on_hub(ping), 20, "redis-server in the hub namespace")

        def anonymous() -> str:
            try:
                redis_client(None).get("x")
            except (redis.AuthenticationError, redis.ResponseError) as exc:
                return f"refused: {exc}"
            return "no password needed"

        refused = on_hub(anonymous)
        assert refused.startswith("refused") and "auth" in refused.lower(), refused

        common = dict(visibility_timeout_s=3, heartbeat_s=0.9, request_timeout_s=150)
        api_env = kit.service_env(**common, redis_url=f"redis://:{PASSWORD}@127.0.0.1:{REDIS_PORT}/0")
        api = hosts.start("hub", "api", [sys.executable, "-m", "server.cli", "api", "--host", "127.0.0.1",
                                         "--port", str(API_PORT)], api_env)
        workers = {}
        for n in (1, 2):
            env = kit.service_env(**common, redis_url=f"redis://:{PASSWORD}@10.254.{n}.1:{REDIS_PORT}/0",
                                  verifier=tiny_models["verifier"], decomposer="", batch_size=2, batch_wait_ms=5)
            workers[n] = hosts.start(f"w{n}", f"w{n}", [sys.executable, "-m", "server.cli", "worker"], env)

        def registered() -> set[int]:
            try:
                r = httpx.get(f"http://127.0.0.1:{API_PORT}/v1/models", timeout=5)
            except httpx.TransportError:
                return set()
            return {int(w["worker_id"].rsplit("-", 2)[1]) for w in r.json()["workers"]} if r.status_code == 200 \
                else set()

        def alive() -> None:
            for name, proc in (("api", api), ("w1", workers[1]), ("w2", workers[2])):
                assert proc.poll() is None, f"{name} exited:\n{hosts.log(name)}"

        pids = {workers[1].pid, workers[2].pid}
        kit.wait_for(lambda: alive() or on_hub(registered) == pids, kit.STARTUP_S, "both remote workers")

        def pending() -> int:
            try:
                return int(redis_client().xpending("dvr:stream:verify", "workers")["pending"])
            except redis.ResponseError:  # no group yet
                return 0

        images = [[kit.png_bytes(300 + 10 * r + i, (64, 64)) for i in range(3)] for r in range(4)]

        def post(r: int) -> httpx.Response:
            body = {"groups": [{"questions": QUESTIONS, "images": [kit.b64(b) for b in images[r]]}]}
            return httpx.post(f"http://127.0.0.1:{API_PORT}/v1/score", json=body, timeout=170)

        workers[2].send_signal(signal.SIGSTOP)  # only w1 claims, so what is held at the cut is w1's
        try:
            time.sleep(0.3)  # w2's last blocking read (batch_wait_ms=5) expires in Redis
            futures = [hub.submit(post, r) for r in range(len(images))]
            kit.wait_for(lambda: on_hub(pending) > 0, 90, "w1 to claim tasks", 0.005)
            hosts.link(1, "down")
            held = on_hub(pending)
            workers[2].send_signal(signal.SIGCONT)
            responses = [f.result(timeout=200) for f in futures]
        finally:
            workers[2].send_signal(signal.SIGCONT)

        assert held > 0
        for r, resp in enumerate(responses):
            assert resp.status_code == 200, resp.text
            (group,) = resp.json()["groups"]
            assert_rewards_close([group["rewards"]], [kit.local_rewards(tiny_verifier, images[r], QUESTIONS)])
        assert on_hub(pending) == 0
        kit.wait_for(lambda: on_hub(registered) == {workers[2].pid}, 30, "the cut-off worker to drop out")

        hosts.link(1, "up")
        kit.wait_for(lambda: alive() or on_hub(registered) == pids, 150, "w1 to rejoin after the link is back",
                     0.5)
        workers[2].send_signal(signal.SIGSTOP)  # the rejoined worker alone must now serve a request
        try:
            time.sleep(0.3)
            again = on_hub(post, 0)
        finally:
            workers[2].send_signal(signal.SIGCONT)
        assert again.status_code == 200, again.text
        assert_rewards_close([again.json()["groups"][0]["rewards"]], [responses[0].json()["groups"][0]["rewards"]])
    finally:
        hub.shutdown(wait=False, cancel_futures=True)
