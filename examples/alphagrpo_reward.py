"""DVReward in the AlphaGRPO reference trainer's reward loop, against a running service.

What the reference trainer does each step, in order: it submits `reward_fn({"images", "prompts", "metadata"})`
to a thread pool while it goes on generating, collects the future later, turns every column into a tensor with
`torch.as_tensor(...).float()`, trains on `avg`, and normalises per prompt with the std of the whole batch
(+1e-4). Here the "generator" renders random shapes with PIL; the questions come in the AlphaGRPO data format
(`semantic_questions` / `quality_questions` in each sample's metadata).

    dvreward serve --verifier DIR/verifier --decomposer DIR/decomposer --port 8000 &
    python examples/alphagrpo_reward.py --server http://127.0.0.1:8000 --steps 3
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageDraw

from trainer_client import DVRewardClient, make_alphagrpo_reward_fn

SAMPLES = [  # prompt and its questions, as the AlphaGRPO training data stores them
    ("a red circle on white", {"semantic_questions": ["Is there a circle?", "Is the circle red?"],
                               "quality_questions": [{"question": "Is the circle round?", "tag": "Geometry"}]}),
    ("a blue square", {"semantic_questions": ["Is there a square?", "Is the square blue?"],
                       "quality_questions": ["Are the square's edges straight?"]}),
]


def generate(rng: np.random.Generator, n: int, size: int) -> list[Image.Image]:
    out = []
    for _ in range(n):
        img = Image.new("RGB", (size, size), "white")
        x, y, r = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [int(rng.integers(size // 8, size // 3))]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (ImageDraw.Draw(img).ellipse if rng.random() < 0.5 else ImageDraw.Draw(img).rectangle)(
            (x - r, y - r, x + r, y + r), fill=fill)
        out.append(img)
    return out


def per_prompt_advantages(prompts: list[str], rewards: torch.Tensor) -> np.ndarray:
    """The reference's stat tracker with its default global std."""
    p, r = np.array(prompts), rewards.double().numpy()
    adv = np.empty_like(r)
    for prompt in np.unique(p):
        adv[p == prompt] = (r[p == prompt] - r[p == prompt].mean()) / (r.std() + 1e-4)
    return adv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=4, help="images per prompt")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the service to be ready")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    executor = ThreadPoolExecutor(max_workers=8)  # the reference trainer's reward pool
    with DVRewardClient(args.server, api_key=args.api_key) as client:
        client.wait_ready(timeout=args.wait)
        reward_fn = make_alphagrpo_reward_fn(client, weight=1.0)
        for step in range(args.steps):
            prompts = [p for p, _ in SAMPLES for _ in range(args.group_size)]
            metadata = [m for _, m in SAMPLES for _ in range(args.group_size)]
            images = generate(rng, len(prompts), args.size)
            future = executor.submit(reward_fn, {"images": images, "prompts": prompts, "metadata": metadata})
            # ... the trainer goes on (decoding latents, the next rollout) and collects the rewards later
            score_details, score_metas = future.result()
            rewards = {k: torch.as_tensor(v).float() for k, v in score_details.items()}
            advantages = per_prompt_advantages(prompts, rewards["avg"])
            failed = sum(e is not None for e in score_metas["error"])
            print(f"step {step}: avg reward {rewards['avg'].mean():.4f} (SC {rewards['dvreward_sc'].mean():.4f}, "
                  f"PQ {rewards['dvreward_pq'].mean():.4f}), advantages in [{advantages.min():.3f}, "
                  f"{advantages.max():.3f}], failed {failed}/{len(prompts)}", flush=True)
    executor.shutdown()


if __name__ == "__main__":
    main()
