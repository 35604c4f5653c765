"""Service overhead: the same inputs scored through API + Redis + worker and by the engine in-process.

Starts a private redis-server, `dvreward api` and one `dvreward worker` (random `small` verifier),
then times both paths on identical images and questions and prints one JSON object.
  python bench/service.py --config small --px 448 --questions 8
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.verifier import max_diff, timed  # noqa: E402
from server.engines.base import VerifyItem  # noqa: E402
from server.engines.hf.verifier import HFVerifier  # noqa: E402
from server.engines.tiny import write_tiny_verifier  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: str | Path) -> tuple[subprocess.Popen[Any], int]:
    """A private redis-server on a free port, keeping nothing on disk, and its port."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    return proc, port


def redis_cpu_s(client: Any) -> float:
    """Redis's own CPU seconds so far (user + system, I/O included), from a redis-py client's INFO."""
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def stop(procs: list[subprocess.Popen[Any]]) -> None:
    """Terminate the services, last started first (each drains), then wait for all of them."""
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


def wait_ready(url: str, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def make_inputs(n: int, k: int, px: int) -> tuple[list[Image.Image], list[str]]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)) for _ in range(n)]
    questions = [f"Is there a {w} object in the picture?" for w in
                 ["red", "blue", "green", "large", "small", "round", "square", "shiny"][:k]]
    questions += [f"Question number {i}?" for i in range(len(questions), k)]
    return images, questions


def png_b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["tiny", "small"], default="small")
    ap.add_argument("--px", type=int, default=448)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--images", type=int, default=32, help="images per round")
    ap.add_argument("--request-images", type=int, default=8, help="images per HTTP request")
    ap.add_argument("--batch-size", type=int, default=8, help="worker batch = in-process batch")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    tmpdir = tempfile.TemporaryDirectory(prefix="dvr-bench-")
    tmp = Path(tmpdir.name)
    model = write_tiny_verifier(tmp / "verifier", size=args.config, max_pixels=args.px * args.px)
    images, questions = make_inputs(args.images, args.questions, args.px)
    encoded = [png_b64(im) for im in images]
    procs: list[subprocess.Popen] = []
    log = open(tmp / "service.log", "w")  # closed in the finally below
    client = httpx.Client(timeout=600)
    try:
        redis_proc, rport = start_redis(tmp)
        procs.append(redis_proc)
        aport = free_port()
        env = {**os.environ, "DVREWARD_REDIS_URL": f"redis://127.0.0.1:{rport}/0", "DVREWARD_VERIFIER": str(model),
               "DVREWARD_DECOMPOSER": "", "DVREWARD_MAX_PIXELS": str(args.px * args.px),
               "DVREWARD_MIN_PIXELS": str(args.px * args.px // 4), "DVREWARD_BATCH_SIZE": str(args.batch_size),
               "DVREWARD_BATCH_WAIT_MS": "20"}
        procs.append(subprocess.Popen(["dvreward", "api", "--port", str(aport)], env=env, stdout=log, stderr=log))
        procs.append(subprocess.Popen(["dvreward", "worker"], env=env, stdout=log, stderr=log))
        url = f"http://127.0.0.1:{aport}"
        wait_ready(url)

        engine = HFVerifier.load(str(model), max_pixels=args.px * args.px, min_pixels=args.px * args.px // 4)
        items = [VerifyItem((im,), tuple(questions)) for im in images]

        def in_process() -> list[list[float]]:
            out: list[list[float]] = []
            for s in range(0, len(items), args.batch_size):
                out.extend(engine.verify(items[s:s + args.batch_size]))
            return out

        chunks = [encoded[s:s + args.request_images] for s in range(0, len(encoded), args.request_images)]

        def one(chunk: list[str]) -> list[list[float]]:
            r = client.post(url + "/v1/verify", json={"items": [{"images": [b], "questions": questions}
                                                                for b in chunk]})
            r.raise_for_status()
            return [x["p"] for x in r.json()["results"]]

        def through_service() -> list[list[float]]:
            with cf.ThreadPoolExecutor(len(chunks)) as pool:
                return [p for res in pool.map(one, chunks) for p in res]

        t_in, p_in = timed(in_process, args.repeat)
        t_svc, p_svc = timed(through_service, args.repeat)
        diff = max_diff(p_in, p_svc)
        print(json.dumps({
            "config": args.config, "px": args.px, "questions": args.questions, "images": args.images,
            "request_images": args.request_images, "batch_size": args.batch_size, "repeat": args.repeat,
            "in_process_images_per_s": round(args.images / t_in, 2),
            "service_images_per_s": round(args.images / t_svc, 2),
            "ratio": round(t_in / t_svc, 3), "max_abs_diff": diff, "machine": platform.node(),
            "cpus": os.cpu_count(),
        }))
    finally:
        stop(procs)
        client.close()
        log.close()
        tmpdir.cleanup()


if __name__ == "__main__":
    main()
