"""The runnable examples run against a real service (tiny models) and print what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, url: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--server", url, *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_alphagrpo_reward_example(service_url):
    out = _run("alphagrpo_reward.py", service_url, "--steps", "2", "--group-size", "3")
    steps = re.findall(r"^step (\d): avg reward ([\d.]+) .*failed (\d+)/6$", out, re.M)
    assert [s for s, _, _ in steps] == ["0", "1"], out
    assert all(0 < float(r) < 1 and f == "0" for _, r, f in steps), out
