"""The serving layer to its knee: API + Redis + workers whose verifier answers at once (bench/instant.py).

Starts a private redis-server, --apis `dvreward api` processes and --workers instant workers, then offers
/v1/verify requests of --images 512² JPEG q95 images (the client's default encoding; --transport: as binary
multipart parts, the client's default, or base64 in JSON) at increasing concurrency until throughput stops
growing. Per level: images/s, p50/p99 latency, CPU per image of the
API processes, the workers and Redis (from /proc and Redis's own INFO), and Redis commands per image (INFO
commandstats). One JSON line; on a small machine the load generator shares the cores, so judge the layer
by CPU per image, not by images/s alone.

    python bench/scale.py
    python bench/scale.py --apis 2 --workers 2 --levels 1 2 4 8 16 32
    python bench/scale.py --transport json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.client import make_step  # noqa: E402
from bench.service import free_port, redis_cpu_s, start_redis, stop, wait_ready  # noqa: E402
from dvreward_protocol.schemas import VerifyItemIn, VerifyRequest  # noqa: E402
from trainer_client.encoding import EncodeOptions, encode_image  # noqa: E402
from trainer_client.wire import Body  # noqa: E402

QUESTIONS = ["Is there a cat?", "Is the cat orange?", "Is the cat on a sofa?", "Is the image sharp?"]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc: every thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def redis_usage(client: redis.Redis) -> tuple[float, int, dict[str, int]]:
    """(CPU seconds, total commands, commands by name) of the Redis server so far."""
    stats = client.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    return redis_cpu_s(client), sum(calls.values()), calls


def request_body(n: int, size: int, transport: str) -> tuple[bytes, str]:
    """A /v1/verify body of `n` JPEGs and its Content-Type, written as the trainer client writes it."""
    body = Body(transport == "multipart")
    items = []
    for a in make_step(1, n, size, seed=0)[0]:
        items.append(VerifyItemIn(images=[body.image(encode_image(a, EncodeOptions()))], questions=QUESTIONS))
    return body.encode(VerifyRequest(items=items))


@dataclass
class Level:
    concurrency: int
    images: int = 0
    failures: int = 0
    latencies: list[float] | None = None


async def offer(urls: list[str], body: tuple[bytes, str], n_images: int, concurrency: int, seconds: float) -> Level:
    """`concurrency` requests in flight for `seconds` (round-robin over the APIs)."""
    level = Level(concurrency, latencies=[])
    end = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def loop(k: int) -> None:
            i = k
            while time.monotonic() < end:
                t0 = time.perf_counter()
                r = await client.post(urls[i % len(urls)] + "/v1/verify", content=body[0],
                                      headers={"content-type": body[1]})
                i += 1
                if r.status_code == 200 and all(x["p"] is not None for x in r.json()["results"]):
                    level.images += n_images
                    assert level.latencies is not None
                    level.latencies.append(time.perf_counter() - t0)
                else:
                    level.failures += 1

        await asyncio.gather(*(loop(k) for k in range(concurrency)))
    return level


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--apis", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--images", type=int, default=32, help="images per /v1/verify request")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--seconds", type=float, default=8.0, help="measured time per level")
    ap.add_argument("--transport", choices=["multipart", "json"], default="multipart",
                    help="the images as binary multipart parts (what the client sends where the API takes them) or "
                    "as base64 in JSON")
    args = ap.parse_args()

    body = request_body(args.images, args.size, args.transport)
    tmp = tempfile.TemporaryDirectory(prefix="dvr-scale-")
    procs: list[subprocess.Popen[bytes]] = []
    log = open(Path(tmp.name) / "services.log", "wb")  # noqa: SIM115 - closed below
    try:
        redis_proc, rport = start_redis(tmp.name)
        procs.append(redis_proc)
        env = {**os.environ, "DVREWARD_REDIS_URL": f"redis://127.0.0.1:{rport}/0", "DVREWARD_VERIFIER": "instant",
               "DVREWARD_DECOMPOSER": "", "DVREWARD_MAX_IMAGES": str(max(512, args.images)),
               "DVREWARD_BATCH_SIZE": "32", "DVREWARD_MAX_QUEUE": "100000", "PYTHONUNBUFFERED": "1"}
        ports = [free_port() for _ in range(args.apis)]
        apis = [subprocess.Popen([sys.executable, "-m", "server.cli", "api", "--port", str(p)], env=env, cwd=ROOT,
                                 stdout=log, stderr=log) for p in ports]
        workers = [subprocess.Popen([sys.executable, str(ROOT / "bench" / "instant.py")], env=env, cwd=ROOT,
                                    stdout=log, stderr=log) for _ in range(args.workers)]
        procs += apis + workers
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for url in urls:
            wait_ready(url)
        rc = redis.Redis(port=rport)
        asyncio.run(offer(urls, body, args.images, 2, 2.0))  # warm-up: connections, imports, Lua scripts
        rows = []
        for c in args.levels:
            api0, wk0 = sum(cpu_s(p.pid) for p in apis), sum(cpu_s(p.pid) for p in workers)
            r_cpu0, r_calls0, by0 = redis_usage(rc)
            t0 = time.perf_counter()
            level = asyncio.run(offer(urls, body, args.images, c, args.seconds))
            wall = time.perf_counter() - t0
            api1, wk1 = sum(cpu_s(p.pid) for p in apis), sum(cpu_s(p.pid) for p in workers)
            r_cpu1, r_calls1, by1 = redis_usage(rc)
            n = max(level.images, 1)
            lat = level.latencies or []
            rows.append({
                "concurrency": c, "images_per_s": round(level.images / wall, 1), "failures": level.failures,
                "p50_s": round(pct(lat, 0.5), 3), "p99_s": round(pct(lat, 0.99), 3),
                "api_cpu_ms_per_image": round(1000 * (api1 - api0) / n, 3),
                "worker_cpu_ms_per_image": round(1000 * (wk1 - wk0) / n, 3),
                "redis_cpu_ms_per_image": round(1000 * (r_cpu1 - r_cpu0) / n, 4),
                "redis_commands_per_image": round((r_calls1 - r_calls0) / n, 2),
                "redis_commands": {k: round((v - by0.get(k, 0)) / n, 2) for k, v in by1.items()
                                   if v - by0.get(k, 0) > 0 and k not in ("info",)},
            })
        knee = next((a for a, b in zip(rows, rows[1:], strict=False) if b["images_per_s"] < 1.05 * a["images_per_s"]),
                    rows[-1])
        half = min(rows, key=lambda r: abs(r["concurrency"] - knee["concurrency"] / 2))
        print(json.dumps({
            **{k: knee[k] for k in ("images_per_s", "p50_s", "p99_s", "api_cpu_ms_per_image",
                                    "worker_cpu_ms_per_image", "redis_cpu_ms_per_image", "redis_commands_per_image")},
            "knee_concurrency": knee["concurrency"], "p99_s_at_half_the_knee": half["p99_s"],
            "transport": args.transport, "images_per_request": args.images, "image_size": args.size,
            "request_mb": round(len(body[0]) / 1e6, 2),
            "apis": args.apis, "workers": args.workers, "seconds_per_level": args.seconds, "levels": rows,
            "machine": platform.node(), "cpus": os.cpu_count(),
        }))
    finally:
        stop(procs)
        log.close()
        tmp.cleanup()


if __name__ == "__main__":
    main()
