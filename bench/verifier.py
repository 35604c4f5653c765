"""Packed vs one-sequence-per-pair verification on the same model and inputs, in one run.

Random weights (throughput does not depend on them). Prints one JSON object.
  python bench/verifier.py --device cpu --config small --px 448 --questions 8
  python bench/verifier.py --device cuda --dtype bfloat16 --config qwen2.5-vl-7b --px 504 --questions 8 --images 32
Needs only torch, transformers, tokenizers and pillow (no web stack).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from server.engines import defaults  # noqa: E402
from server.engines.base import VerifyItem  # noqa: E402
from server.engines.hf.verifier import HFVerifier  # noqa: E402
from server.engines.hf.vision_attention import enable_batched_vision_attention  # noqa: E402
from server.engines.tiny import verifier_config, write_tiny_verifier  # noqa: E402


def build(args: argparse.Namespace, workdir: Path) -> HFVerifier:
    """tiny/small: written and loaded through the real loader; 7b: real shapes built on the device."""
    size = "small" if args.config == "small" else "tiny"
    path = write_tiny_verifier(workdir / "verifier", size=size, max_pixels=args.px * args.px)
    if args.config != "qwen2.5-vl-7b":
        return HFVerifier.load(str(path), device=args.device, dtype=args.dtype, batched_vision=args.vision == "batched",
                               max_pixels=args.px * args.px, min_pixels=args.px * args.px // 4)
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg = verifier_config(tokenizer, args.config)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=getattr(torch, args.dtype)).eval()
    if args.vision == "batched":
        enable_batched_vision_attention(model)
    proc = Qwen2VLImageProcessorPil.from_pretrained(
        path, size={"shortest_edge": args.px * args.px // 4, "longest_edge": args.px * args.px})
    return HFVerifier(model, tokenizer, proc, model_id="random:qwen2.5-vl-7b")


def make_items(n: int, k: int, px: int) -> list[VerifyItem]:
    rng = np.random.default_rng(0)
    words = "is there a red cat dog on the left of blue table under sky in watercolor style".split()
    items = []
    for _ in range(n):
        img = Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8))
        qs = tuple(" ".join(rng.choice(words, size=int(rng.integers(6, 16)))).capitalize() + "?" for _ in range(k))
        items.append(VerifyItem((img,), qs))
    return items


T = TypeVar("T")


def timed(run: Callable[[], T], repeat: int, sync: Callable[[], object] = lambda: None) -> tuple[float, T]:
    """Median seconds of `repeat` runs after one warm-up run, and the last run's output; `sync` waits for
    the device (a CUDA run returns before its kernels finish)."""
    out = run()
    ts = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        out = run()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    """The largest |Δp| between two runs' p, question by question."""
    return max(abs(u - w) for x, y in zip(a, b, strict=True) for u, w in zip(x, y, strict=True))


def packed_memory(v: HFVerifier, items: list[VerifyItem]) -> dict[str, float | int | None]:
    """The packed layout's batches, its largest attention mask (B*L*L booleans, bounded by the token budget
    times L) and, on CUDA, the peak memory allocated while scoring (the largest batch sets it)."""
    lengths = [len(p.prefix) + sum(len(b) for b in p.blocks) for it in items for p in v._prepare(it)]
    batches = list(v._batches(lengths))
    mask = max(len(b) * max(lengths[i] for i in b) ** 2 for b in batches)
    peak = None
    if v.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        v.verify(items)
        peak = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {"batches": len(batches), "longest_item_tokens": max(lengths), "mask_mb_max": round(mask / 2**20, 2),
            "peak_cuda_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=defaults.DEVICE)
    ap.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--config", choices=["tiny", "small", "qwen2.5-vl-7b"], default="small")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--px", type=int, default=448)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-batch-tokens", type=int, default=defaults.MAX_BATCH_TOKENS)
    ap.add_argument("--vision", choices=["batched", "loop"], default="batched",
                    help="vision window attention: one call (default) or transformers' loop over windows")
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    with tempfile.TemporaryDirectory() as tmp:
        v = build(args, Path(tmp))
    v.max_batch_tokens = args.max_batch_tokens
    items = make_items(args.images, args.questions, args.px)
    pairs = args.images * args.questions
    sync = torch.cuda.synchronize if v.device.type == "cuda" else (lambda: None)
    v.mode = "packed"
    t_packed, p_packed = timed(lambda: v.verify(items), args.repeat, sync)
    memory = packed_memory(v, items)
    v.mode = "per_pair"
    t_pair, p_pair = timed(lambda: v.verify(items), args.repeat, sync)
    diff = max_diff(p_packed, p_pair)
    print(json.dumps({
        "config": args.config, "device": str(v.device), "dtype": args.dtype, "vision": args.vision,
        "images": args.images,
        "questions": args.questions, "px": args.px, "repeat": args.repeat,
        "per_pair_s": round(t_pair, 4), "packed_s": round(t_packed, 4),
        "per_pair_pairs_per_s": round(pairs / t_pair, 2), "packed_pairs_per_s": round(pairs / t_packed, 2),
        "packed_images_per_s": round(args.images / t_packed, 2), "speedup": round(t_pair / t_packed, 2),
        "max_abs_diff": diff, "packed_memory": memory, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.node(),
        "gpu": torch.cuda.get_device_name() if v.device.type == "cuda" else None,
    }))


if __name__ == "__main__":
    main()
