"""How many images per second one Redis serves: `redis-benchmark` on the queue's own value sizes.

Starts a private redis-server and drives it with `redis-benchmark` (so the load generator is Redis's own,
not this project's client) for the operations an image costs on the queue: the task's XADD with the image
bytes, the worker's read of a batch of such entries, and the small commands (acknowledge, reply push and
pop). Redis's CPU per operation comes from its own INFO (user + system, I/O included) and its command time
from INFO commandstats. The ceiling is one Redis core divided by the CPU of one image's mix:

    ceiling = 1e6 / (xadd_us + read_batch_us / batch + small_us * small_commands_per_image)

`--small-commands-per-image` is what bench/scale.py measures beyond the XADD and the read. One JSON line.

    python bench/redis_ceiling.py --image-bytes 97000 --small-commands-per-image 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.service import redis_cpu_s, start_redis, stop  # noqa: E402

H200_IMAGES_PER_S = 60.0  # one H200's verifier throughput the deployment plans for (DESIGN.md targets)


def bench(client: redis.Redis, port: int, n: int, clients: int, *command: str) -> dict[str, float]:
    """Run one command n times through redis-benchmark; Redis's CPU and command time per call, and calls/s."""
    client.config_resetstat()
    cpu0 = redis_cpu_s(client)
    t0 = time.perf_counter()
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-n", str(n), "-c", str(clients), "--csv", *command],
                         check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    cpu = redis_cpu_s(client) - cpu0
    stat = client.info("commandstats").get(f"cmdstat_{command[0].lower()}", {})
    rps = float(out.strip().splitlines()[-1].split(",")[1].strip('"'))
    return {"calls_per_s": round(rps, 1), "redis_cpu_us_per_call": round(1e6 * cpu / n, 2),
            "command_us_per_call": round(float(stat.get("usec_per_call", 0.0)), 2), "wall_s": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-bytes", type=int, default=97_000, help="bytes of one encoded image (512² JPEG q95)")
    ap.add_argument("--result-bytes", type=int, default=300, help="bytes of one task's result on the reply list")
    ap.add_argument("--batch", type=int, default=32, help="entries a worker reads at once")
    ap.add_argument("--small-commands-per-image", type=float, required=True,
                    help="Redis commands per image besides the XADD and the batch read (from bench/scale.py)")
    ap.add_argument("-n", type=int, default=20_000, help="calls per measured command")
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()
    if args.image_bytes > 120_000:  # one argv string is at most 128 KiB on Linux
        sys.exit("--image-bytes must stay under 120000 (redis-benchmark takes the value on its command line)")

    image, result = "x" * args.image_bytes, "r" * args.result_bytes
    tmp = tempfile.TemporaryDirectory(prefix="dvr-redis-")
    server, port = start_redis(tmp.name)
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        keep = max(1000, args.batch)  # the stream stays bounded, as the queue's is
        rows = {
            "xadd_image": bench(client, port, args.n, args.clients,
                                "XADD", "s", "MAXLEN", "~", str(keep), "*", "task", result, "blob0", image),
            "xrange_batch": bench(client, port, max(200, args.n // args.batch), args.clients,
                                  "XRANGE", "s", "-", "+", "COUNT", str(args.batch)),
            "rpush_result": bench(client, port, args.n, args.clients, "RPUSH", "r", result),
            "lpop_result": bench(client, port, args.n, args.clients, "LPOP", "r"),
            "xack": bench(client, port, args.n, args.clients, "XACK", "s", "g", "0-1"),
        }
        small = [rows[k]["redis_cpu_us_per_call"] for k in ("rpush_result", "lpop_result", "xack")]
        small_us = sorted(small)[len(small) // 2]
        per_image_us = (rows["xadd_image"]["redis_cpu_us_per_call"]
                        + rows["xrange_batch"]["redis_cpu_us_per_call"] / args.batch
                        + small_us * args.small_commands_per_image)
        ceiling = 1e6 / per_image_us
        print(json.dumps({
            "redis_cpu_us_per_image": round(per_image_us, 1), "ceiling_images_per_s": round(ceiling),
            "h200s_at_60_img_s": int(ceiling // H200_IMAGES_PER_S),
            "network_mb_per_s_at_ceiling": round(ceiling * 2 * args.image_bytes / 1e6),
            "image_bytes": args.image_bytes, "result_bytes": args.result_bytes, "batch": args.batch,
            "small_commands_per_image": args.small_commands_per_image, "small_us_per_call": small_us,
            "commands": rows, "redis": client.info("server")["redis_version"],
            "machine": platform.node(), "cpus": os.cpu_count(),
        }))
    finally:
        stop([server])
        tmp.cleanup()


if __name__ == "__main__":
    main()
