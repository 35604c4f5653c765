"""Rewards overlapping generation: the wait for a step's rewards after its last group is generated.

A simulated generator produces one group every --gen-ms (by default a group's share of the measured time to
score a whole step, so generation keeps pace with scoring). "blocking" generates the whole step, then scores it in one
`score()` call; "overlapped" submits each group as it is generated (`client.step()`) and asks for the step's
result after the last. Against --server URL, or a `dvreward serve` subprocess with tiny models that it
starts (explicit questions). One run, one JSON line; medians over --repeat steps.

    python bench/overlap.py
    python bench/overlap.py --server http://host:8000 --prompts 32 --group-size 14 --size 512
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.client import QUESTIONS, embedded_service, make_step  # noqa: E402
from trainer_client import DVRewardClient  # noqa: E402

TARGET = 0.2  # the overlapped wait after the last group, as a fraction of the blocking call's


def blocking(client: DVRewardClient, prompts: list[str], step: list[list[np.ndarray]],
             generate: Callable[[], None]) -> float:
    for _ in step:
        generate()
    t_last = time.perf_counter()
    client.score(prompts, step, questions=[QUESTIONS] * len(step))
    return time.perf_counter() - t_last


def overlapped(client: DVRewardClient, prompts: list[str], step: list[list[np.ndarray]],
               generate: Callable[[], None]) -> float:
    with client.step() as s:
        for prompt, group in zip(prompts, step, strict=True):
            generate()
            s.submit(prompt, group, QUESTIONS)
        t_last = time.perf_counter()
        s.result()
    return time.perf_counter() - t_last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", help="URL of a running service; default: start an embedded one with tiny models")
    ap.add_argument("--prompts", type=int, default=16, help="groups per step")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--gen-ms", type=float, default=None, help="generation time per group (default: its scoring time)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-pixels", type=int, default=112 * 112, help="embedded server's verifier resolution")
    args = ap.parse_args()

    step = make_step(args.prompts, args.group_size, args.size, seed=0)
    prompts = [f"prompt {i}" for i in range(args.prompts)]
    with contextlib.ExitStack() as stack:
        url = args.server or stack.enter_context(embedded_service(args.max_pixels))
        client = stack.enter_context(DVRewardClient(url))
        client.score(prompts, step, questions=[QUESTIONS] * len(step))  # warm-up
        whole = []
        for _ in range(2):  # a group's share of scoring a whole step: throughput, not one group's latency
            t0 = time.perf_counter()
            client.score(prompts, step, questions=[QUESTIONS] * len(step))
            whole.append((time.perf_counter() - t0) / len(step))
        per_group = max(whole)
        gen_s = args.gen_ms / 1000 if args.gen_ms is not None else per_group

        def generate() -> None:
            time.sleep(gen_s)

        waits: dict[str, list[float]] = {"blocking": [], "overlapped": []}
        for _ in range(args.repeat):
            waits["blocking"].append(blocking(client, prompts, step, generate))
            waits["overlapped"].append(overlapped(client, prompts, step, generate))
    b, o = statistics.median(waits["blocking"]), statistics.median(waits["overlapped"])
    print(json.dumps({
        "groups": args.prompts, "group_size": args.group_size, "image_size": args.size, "repeat": args.repeat,
        "scoring_s_per_group": round(per_group, 4), "generation_s_per_group": round(gen_s, 4),
        "blocking_wait_s": round(b, 3), "overlapped_wait_s": round(o, 3), "ratio": round(o / b, 3),
        "target_ratio_max": TARGET, "meets_target": o / b <= TARGET,
        "waits": {k: [round(x, 3) for x in v] for k, v in waits.items()},
        "server": args.server or "embedded tiny (subprocess)", "machine": platform.node(), "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
