"""How much p moves with batch composition, per dtype and layout, on the same model and inputs.

Each item is scored alone and inside one batch of all items; max |Δp| is reported for the packed
and the per-pair layout in float32 and bfloat16, and how far bfloat16's p lie from float32's.
Prints one JSON object.
  python bench/batch_noise.py --config tiny --images 8 --questions 8 --px 448
Needs only torch, transformers, tokenizers and pillow (no web stack).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.verifier import make_items, max_diff  # noqa: E402
from server.engines import defaults  # noqa: E402
from server.engines.hf.verifier import HFVerifier  # noqa: E402
from server.engines.tiny import VERIFIER_ARCHS, write_tiny_verifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=defaults.DEVICE)
    ap.add_argument("--config", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--arch", choices=VERIFIER_ARCHS, default="qwen2.5-vl")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--px", type=int, default=448)
    args = ap.parse_args()
    items = make_items(args.images, args.questions, args.px)
    out: dict[str, object] = {"config": args.config, "arch": args.arch, "device": args.device,
                              "images": args.images, "questions": args.questions, "px": args.px}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_tiny_verifier(Path(tmp) / "v", size=args.config, arch=args.arch))
        batch: dict[str, list[list[float]]] = {}
        for dtype in ("float32", "bfloat16"):
            v = HFVerifier.load(path, device=args.device, dtype=dtype)
            for mode in ("packed", "per_pair"):
                v.mode = mode
                batch[f"{dtype}_{mode}"] = v.verify(items)
                alone = [v.verify([it])[0] for it in items]
                out[f"{dtype}_{mode}_max_abs_shift"] = max_diff(alone, batch[f"{dtype}_{mode}"])
        out["bfloat16_vs_float32_max_abs_diff"] = max_diff(batch["bfloat16_packed"], batch["float32_packed"])
    out.update(torch=torch.__version__, machine=platform.node())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
