"""Chaos: scoring under load while workers and Redis are killed, frozen and restarted.

Starts a private redis-server, `dvreward api` and N `dvreward worker`s (tiny random models), runs a
bounded load of concurrent clients (each logical request keeps one Idempotency-Key across its
retries) and, during it: SIGKILL of a worker mid-batch (restarted, as a supervisor would), SIGSTOP /
SIGCONT of a worker, SIGSTOP / SIGCONT of Redis, Redis killed and restarted. Loopback only.

Prints one JSON object: requests ok / failed by status / lost, p50 / p99 latency, the largest |Δp|
against the same engine in this process, and rewards of 0 or NaN that the reference does not have.
  python bench/chaos.py --workers 2 --clients 8 --duration 60
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.service import free_port, png_b64, wait_ready  # noqa: E402
from dvreward_protocol.questions import Question  # noqa: E402
from dvreward_protocol.reward import aggregate  # noqa: E402
from server.engines.base import VerifyItem  # noqa: E402
from server.engines.hf.verifier import HFVerifier  # noqa: E402
from server.engines.tiny import write_tiny_verifier  # noqa: E402

QUESTIONS = [
    {"id": "obj", "text": "Is there a red object?", "tag": "Existence"},
    {"id": "col", "text": "Is the object blue?", "tag": "Attribute", "depends_on": ["obj"]},
    {"id": "cnt", "text": "Are there two objects?", "tag": "Count"},
    {"id": "sharp", "text": "Is the image sharp?", "kind": "quality", "tag": "Texture"},
]


class Proc:
    """One child process (its own session, its own log), restartable, stopped by its own pid."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name, self.args, self.env, self.log = name, args, env, logdir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=ROOT)
        return self

    def signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.kill()
            self.popen.wait(timeout=30)

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGCONT)
        self.popen.terminate()
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class Outcome:
    index: int
    status: int | None = None  # final HTTP status; None: lost (no answer before the client's deadline)
    latency: float | None = None
    attempts: int = 0
    rewards: list[float | None] = field(default_factory=list)
    p: list[dict[str, float] | None] = field(default_factory=list)


def make_bodies(n: int, per_request: int, px: int) -> tuple[list[dict[str, Any]], list[list[Image.Image]]]:
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)) for _ in range(per_request)]
              for _ in range(n)]
    bodies = [{"groups": [{"questions": QUESTIONS, "images": [png_b64(im) for im in row]}]} for row in images]
    return bodies, images


def reference(model: Path, images: list[list[Image.Image]], px: int) -> list[list[tuple[float, dict[str, float]]]]:
    """(reward, p) of every image, by the same engine and aggregation in this process."""
    engine = HFVerifier.load(str(model), max_pixels=px * px, min_pixels=px * px // 4)
    qs = [Question.model_validate(q) for q in QUESTIONS]
    out = []
    for row in images:
        ps = engine.verify([VerifyItem((im,), tuple(q.text for q in qs)) for im in row])
        pairs = [dict(zip([q.id for q in qs], p, strict=True)) for p in ps]
        out.append([(aggregate(qs, p).reward, p) for p in pairs])
    return out


def client_loop(url: str, bodies: list[dict[str, Any]], end: float, give_up_s: float, outcomes: list[Outcome],
                lock: threading.Lock, counter: list[int]) -> None:
    """Logical requests until `end`; each retries 429 / 503 / 504 / lost connections with its own key."""
    with httpx.Client(base_url=url, timeout=httpx.Timeout(30.0, connect=5.0)) as c:
        while time.monotonic() < end:
            with lock:
                index = counter[0]
                counter[0] += 1
            out = Outcome(index)
            key = uuid.uuid4().hex
            t0 = time.monotonic()
            while time.monotonic() - t0 < give_up_s:
                out.attempts += 1
                try:
                    r = c.post("/v1/score", json=bodies[index % len(bodies)], headers={"Idempotency-Key": key})
                except httpx.TransportError:
                    time.sleep(0.5)
                    continue
                if r.status_code in (429, 502, 503, 504):
                    time.sleep(min(5.0, float(r.headers.get("Retry-After", "1"))))
                    continue
                out.status, out.latency = r.status_code, time.monotonic() - t0
                if r.status_code == 200:
                    (group,) = r.json()["groups"]
                    out.rewards = group["rewards"]
                    out.p = [im["p"] for im in group["images"]]
                break
            with lock:
                outcomes.append(out)


def chaos(redis: Proc, workers: list[Proc], duration: float, events: list[dict[str, Any]], t0: float,
          redis_up: Any) -> None:
    """The schedule, at fractions of the run; each event is logged with its time."""

    def note(what: str) -> None:
        events.append({"t": round(time.monotonic() - t0, 2), "event": what})

    def at(fraction: float) -> None:
        time.sleep(max(0.0, t0 + fraction * duration - time.monotonic()))

    at(0.15)
    note("SIGKILL worker 0 under load")
    workers[0].kill()
    time.sleep(1.0)
    workers[0].start()
    note("worker 0 restarted")
    at(0.35)
    note("SIGSTOP worker 1 for 5 s")
    workers[-1].signal(signal.SIGSTOP)
    time.sleep(5.0)
    workers[-1].signal(signal.SIGCONT)
    note("SIGCONT worker 1")
    at(0.55)
    note("SIGSTOP Redis for 5 s")
    redis.signal(signal.SIGSTOP)
    time.sleep(5.0)
    redis.signal(signal.SIGCONT)
    note("SIGCONT Redis")
    at(0.75)
    note("SIGKILL Redis")
    redis.kill()
    time.sleep(2.0)
    redis.start()
    redis_up()
    note("Redis restarted (empty: no persistence)")


def percentile(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 3) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (bounded)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (bounded)")
    ap.add_argument("--images", type=int, default=4, help="images per request")
    ap.add_argument("--bodies", type=int, default=8, help="distinct request bodies the clients cycle through")
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--give-up-s", type=float, default=90.0, help="a client's deadline for one logical request")
    args = ap.parse_args()
    if not (1 <= args.clients <= 64 and 0 < args.duration <= 600 and args.workers >= 1):
        ap.error("bounded load only: 1..64 clients, at most 600 s, at least one worker")

    tmpdir = tempfile.TemporaryDirectory(prefix="dvr-chaos-")
    tmp = Path(tmpdir.name)
    model = write_tiny_verifier(tmp / "verifier", size="tiny", max_pixels=args.px * args.px)
    bodies, images = make_bodies(args.bodies, args.images, args.px)
    ref = reference(model, images, args.px)

    rport, aport = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{rport}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVREWARD_")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DVREWARD_REDIS_URL=redis_url,
               DVREWARD_VERIFIER=str(model), DVREWARD_DECOMPOSER="", DVREWARD_MAX_PIXELS=str(args.px * args.px),
               DVREWARD_MIN_PIXELS=str(args.px * args.px // 4), DVREWARD_VISIBILITY_TIMEOUT_S="5",
               DVREWARD_HEARTBEAT_S="1", DVREWARD_REQUEST_TIMEOUT_S="30", DVREWARD_BATCH_SIZE="8")
    cli = [sys.executable, "-m", "server.cli"]
    redis = Proc("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--dir", str(tmp)], env, tmp)
    api = Proc("api", [*cli, "api", "--host", "127.0.0.1", "--port", str(aport)], env, tmp)
    workers = [Proc(f"worker{i}", [*cli, "worker"], env, tmp) for i in range(args.workers)]
    url = f"http://127.0.0.1:{aport}"

    def redis_up() -> None:
        import redis as redis_client

        c = redis_client.Redis(port=rport, socket_connect_timeout=0.5)
        for _ in range(100):
            try:
                if c.ping():
                    break
            except redis_client.ConnectionError:
                time.sleep(0.1)
        c.close()

    procs = [redis, api, *workers]
    try:
        redis.start()
        redis_up()
        api.start()
        for w in workers:
            w.start()
        wait_ready(url, timeout=300)
        with httpx.Client(base_url=url, timeout=60) as c:  # every worker loaded: no startup in the figures
            deadline = time.monotonic() + 300
            while len(c.get("/v1/models").json()["workers"]) < args.workers and time.monotonic() < deadline:
                time.sleep(0.5)

        outcomes: list[Outcome] = []
        events: list[dict[str, Any]] = []
        lock, counter = threading.Lock(), [0]
        t0 = time.monotonic()
        end = t0 + args.duration
        clients = [threading.Thread(target=client_loop, args=(url, bodies, end, args.give_up_s, outcomes, lock,
                                                              counter)) for _ in range(args.clients)]
        for t in clients:
            t.start()
        chaos(redis, workers, args.duration, events, t0, redis_up)
        for t in clients:
            t.join(timeout=args.duration + args.give_up_s + 60)

        ok = [o for o in outcomes if o.status == 200]
        failed: dict[str, int] = {}
        for o in outcomes:
            if o.status is not None and o.status != 200:
                failed[str(o.status)] = failed.get(str(o.status), 0) + 1
        max_dp, bad_rewards, null_rewards = 0.0, 0, 0
        for o in ok:
            for (want_r, want_p), got_r, got_p in zip(ref[o.index % len(bodies)], o.rewards, o.p, strict=True):
                if got_r is None or got_p is None:
                    null_rewards += 1  # an explicit per-image error: counted, never silent
                    continue
                max_dp = max(max_dp, *(abs(got_p[q] - want_p[q]) for q in want_p))
                if (got_r == 0 and want_r != 0) or math.isnan(got_r):
                    bad_rewards += 1
        lat = [o.latency for o in ok if o.latency is not None]
        print(json.dumps({
            "workers": args.workers, "clients": args.clients, "duration_s": args.duration,
            "images_per_request": args.images, "requests": len(outcomes), "ok": len(ok), "failed_by_status": failed,
            "lost": sum(1 for o in outcomes if o.status is None), "attempts": sum(o.attempts for o in outcomes),
            "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99),
            "median_attempts": statistics.median([o.attempts for o in outcomes]) if outcomes else None,
            "max_abs_dp_vs_reference": max_dp, "null_rewards": null_rewards,
            "zero_or_nan_rewards_not_in_reference": bad_rewards, "events": events,
            "machine": platform.node(), "cpus": os.cpu_count(),
        }))
    finally:
        for p in reversed(procs):
            p.stop()
        tmpdir.cleanup()


if __name__ == "__main__":
    main()
