"""Client cost of one GRPO step: encode + upload 32 prompts x 14 images of 512x512, JPEG (default) vs PNG, each
sent as binary multipart parts (the client's default where the server takes them) and as base64 JSON.

Measures the client process only (time.process_time: every thread of this process, not the server),
plus wall time per step; `encode_only_cpu_s` is the image encoding alone, which no transport changes.
Against --server URL, or a `dvreward serve` subprocess with tiny models that it starts (explicit
questions, so no decomposition; a small --max-pixels so the tiny verifier's compute does not dominate
the wall time). Prints one JSON object.

    python bench/client.py                       # starts its own embedded service
    python bench/client.py --server http://host:8000 --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's client, as its server runs from it

from trainer_client import DVRewardClient  # noqa: E402
from trainer_client.encoding import encode_image  # noqa: E402

QUESTIONS = [
    {"id": "obj", "text": "Is there a cat?", "tag": "Existence"},
    {"id": "col", "text": "Is the cat orange?", "tag": "Attribute", "depends_on": ["obj"]},
    {"id": "geo", "text": "Is the cat's body shape anatomically plausible?", "kind": "quality", "tag": "Anatomy"},
]


def make_step(prompts: int, group: int, size: int, seed: int) -> list[list[np.ndarray]]:
    """Random-ish generated-looking images: gradients, a few flat blocks and sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for _ in range(prompts):
        grp = []
        for _ in range(group):
            a, b, c = rng.uniform(0, 255, 3)
            img = np.stack([a * xx + 40 * yy, b * yy + 30 * xx, c * (xx + yy) / 2], axis=-1)
            for _ in range(3):
                y0, x0 = rng.integers(0, size * 3 // 4, 2)
                h, w = rng.integers(size // 8, size // 3, 2)
                img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, 3)
            img += rng.normal(0, 4, img.shape)
            grp.append(np.clip(img, 0, 255).astype(np.uint8))
        out.append(grp)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def embedded_service(max_pixels: int) -> Iterator[str]:
    """Tiny models written and served by subprocesses, so none of their CPU is counted as the client's."""
    with tempfile.TemporaryDirectory(prefix="dvreward-bench-") as tmp:
        subprocess.run([sys.executable, "-c", "import sys; from server.engines.tiny import write_tiny_models; "
                        "write_tiny_models(sys.argv[1])", tmp], check=True, capture_output=True)
        port = _free_port()
        log = open(Path(tmp) / "serve.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--verifier", f"{tmp}/verifier", "--decomposer",
             f"{tmp}/decomposer", "--port", str(port), "--max-pixels", str(max_pixels)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            with DVRewardClient(url) as c:
                c.wait_ready(timeout=180)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()


def bench_format(url: str, fmt: str, transports: list[str], step: list[list[np.ndarray]], steps: int,
                 chunk_images: int, concurrency: int) -> dict:
    """One client per transport, their steps taken in turn with the encoding alone (so that the shared machine's load
    falls on each alike); medians over the rounds."""
    prompts = [f"prompt {i}" for i in range(len(step))]
    questions = [QUESTIONS] * len(step)
    name, _, level = fmt.partition(":")  # "png:1" = PNG at zlib level 1; plain "png" = the client default
    extra = {"png_compress_level": int(level)} if level else {}
    with contextlib.ExitStack() as stack:
        clients = {t: stack.enter_context(DVRewardClient(url, image_format=name, chunk_images=chunk_images,
                                                         max_concurrency=concurrency, request_format=t, **extra))
                   for t in transports}
        runs: dict[str, dict[str, list]] = {t: {"cpu": [], "wall": [], "server_ms": [], "requests": []}
                                            for t in transports}
        for client in clients.values():
            client.score(prompts, step, questions=questions)  # warm-up: connections, threads, server caches
        first = next(iter(clients.values()))
        flat = [im for g in step for im in g]
        encode_cpu, sizes = [], []
        for _ in range(steps):
            c0 = time.process_time()  # the encoding alone, in the client's pool, once a round
            sizes = [len(b) for b in first._encode_pool.map(lambda a: encode_image(a, first.encode_options), flat)]
            encode_cpu.append(time.process_time() - c0)
            for t, client in clients.items():
                c0, w0 = time.process_time(), time.perf_counter()
                result = client.score(prompts, step, questions=questions)
                runs[t]["cpu"].append(time.process_time() - c0)
                runs[t]["wall"].append(time.perf_counter() - w0)
                runs[t]["server_ms"].append(result.timings.total_ms)
                runs[t]["requests"].append(len(result.request_ids))
    encode = statistics.median(encode_cpu)
    out: dict = {"encode_only_cpu_s": round(encode, 3), "encoded_mb_per_step": round(sum(sizes) / 1e6, 1)}
    for t, r in runs.items():
        cpu = statistics.median(r["cpu"])
        out[t] = {
            "client_cpu_s_per_step": round(cpu, 3),
            "client_cpu_s_per_step_mean": round(sum(r["cpu"]) / len(r["cpu"]), 3),
            # what the transport adds to the encoding: base64, JSON and multipart, sending, parsing answers
            "client_cpu_s_beyond_encoding": round(cpu - encode, 3),
            "wall_s_per_step": round(statistics.median(r["wall"]), 3),
            "requests_per_step": r["requests"][-1],
            "server_slowest_request_ms": round(statistics.median(r["server_ms"]), 1),
        }
    if {"json", "multipart"} <= runs.keys():
        for k in ("client_cpu_s_per_step", "client_cpu_s_beyond_encoding", "wall_s_per_step"):
            out[f"{k}_ratio_json_over_multipart"] = round(out["json"][k] / max(out["multipart"][k], 1e-9), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", help="URL of a running service; default: start an embedded one with tiny models")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=14)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--formats", nargs="+", default=["jpeg", "png", "png:0"],
                    help="jpeg (the client default), png (default level), png:LEVEL, webp")
    ap.add_argument("--transports", nargs="+", default=["multipart", "json"], choices=["multipart", "json"],
                    help="how images travel: binary multipart parts (the client's choice where the server takes "
                    "them) or base64 in JSON")
    ap.add_argument("--chunk-images", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-pixels", type=int, default=112 * 112, help="embedded server's verifier resolution")
    args = ap.parse_args()

    step = make_step(args.prompts, args.group_size, args.size, seed=0)
    with contextlib.ExitStack() as stack:
        url = args.server or stack.enter_context(embedded_service(args.max_pixels))
        models = httpx.get(url + "/v1/models", timeout=30).json()
        out: dict = {
            "images_per_step": args.prompts * args.group_size, "image_size": args.size, "steps": args.steps,
            "client_cpus": os.cpu_count(), "chunk_images": args.chunk_images, "concurrency": args.concurrency,
            "server": "embedded tiny (subprocess)" if not args.server else args.server,
            "verifier": (models.get("workers") or [{}])[0].get("verifier"),
        }
        for fmt in args.formats:
            out[fmt] = bench_format(url, fmt, args.transports, step, args.steps, args.chunk_images,
                                    args.concurrency)
    t = args.transports[0]
    if "png" in out and "jpeg" in out:
        for k in ("client_cpu_s_per_step", "wall_s_per_step"):
            out[f"{k}_ratio_png_over_jpeg"] = round(out["png"][t][k] / max(out["jpeg"][t][k], 1e-9), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
