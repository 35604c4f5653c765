"""A runnable toy GRPO loop against a DVReward service, with a tiny CPU "generator" (no download).

The policy is one Gaussian per prompt over the parameters of a coloured shape (colour, size, position,
shape logits) that PIL renders; each step samples G images per prompt, scores them through the trainer
client, and moves each prompt's mean along the advantage-weighted noise (a REINFORCE / evolution-strategies
update). With tiny random models the reward is meaningless; with real ones the shapes drift towards the
prompts.

    dvreward serve --verifier DIR/verifier --decomposer DIR/decomposer --port 8000 &
    python examples/grpo_loop.py --server http://127.0.0.1:8000 --steps 5 --group-size 4
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from PIL import Image, ImageDraw

from trainer_client import DVRewardClient

SHAPES = ("circle", "square", "triangle")
N_PARAMS = 9  # r, g, b, size, x, y, and one logit per shape


class ShapePolicy:
    """A Gaussian per prompt over shape parameters: the smallest thing GRPO can train."""

    def __init__(self, n_prompts: int, sigma: float, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.mu = self.rng.uniform(0.2, 0.8, (n_prompts, N_PARAMS))
        self.sigma = sigma

    def sample(self, prompt: int, n: int) -> np.ndarray:
        return self.mu[prompt] + self.sigma * self.rng.standard_normal((n, N_PARAMS))

    def update(self, prompt: int, samples: np.ndarray, advantages: np.ndarray, lr: float) -> None:
        """mu += lr * E[A * eps] * sigma; failed images (NaN advantage) are left out, never counted as 0."""
        ok = np.isfinite(advantages)
        if ok.any():
            eps = (samples[ok] - self.mu[prompt]) / self.sigma
            self.mu[prompt] += lr * self.sigma * (advantages[ok, None] * eps).mean(axis=0)


def render(theta: np.ndarray, size: int) -> np.ndarray:
    """Parameters to a uint8 HWC image: one shape on a white canvas."""
    r, g, b, s, x, y = np.clip(theta[:6], 0.0, 1.0)
    shape = SHAPES[int(np.argmax(theta[6:9]))]
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    half = (0.1 + 0.4 * s) * size / 2
    cx, cy = (0.2 + 0.6 * x) * size, (0.2 + 0.6 * y) * size
    color = (int(255 * r), int(255 * g), int(255 * b))
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=color)
    return np.asarray(img)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="http://127.0.0.1:8000", help="DVReward service URL")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts", nargs="+", default=["a red circle", "a small blue square", "a green triangle"])
    ap.add_argument("--group-size", type=int, default=4, help="images per prompt (G)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--sigma", type=float, default=0.15)
    ap.add_argument("--clip", type=float, default=5.0, help="advantage clip (the reference used 5)")
    ap.add_argument("--image-format", choices=["png", "jpeg", "webp"], default="png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the service to be ready")
    args = ap.parse_args()

    policy = ShapePolicy(len(args.prompts), args.sigma, args.seed)
    with DVRewardClient(args.server, api_key=args.api_key, on_error="nan", image_format=args.image_format) as client:
        client.wait_ready(timeout=args.wait)
        for step in range(args.steps):
            t0 = time.perf_counter()
            samples = [policy.sample(p, args.group_size) for p in range(len(args.prompts))]
            images = [[render(t, args.size) for t in s] for s in samples]
            t_gen = time.perf_counter() - t0
            result = client.score(args.prompts, images, clip=args.clip)
            if step == 0:
                for prompt, qs in zip(args.prompts, result.questions, strict=True):
                    print(f"{prompt!r}: {len(qs)} questions, e.g. {qs[0].text[:60]!r}")
            for p, adv in enumerate(result.advantages):
                policy.update(p, samples[p], np.asarray(adv, dtype=float), args.lr)
            rewards = np.asarray(result.flat_rewards(), dtype=float)
            failed = int(np.isnan(rewards).sum())
            mean = float(np.nanmean(rewards)) if failed < rewards.size else math.nan
            std = float(np.nanstd(rewards)) if failed < rewards.size else math.nan
            print(f"step {step}: reward mean {mean:.4f} std {std:.4f} failed {failed}/{rewards.size} | "
                  f"generate {t_gen:.2f}s score {result.wall_s:.2f}s (server {result.timings.total_ms:.0f} ms) "
                  f"total {time.perf_counter() - t0:.2f}s", flush=True)


if __name__ == "__main__":
    main()
