"""The GPU machines have torch and transformers but no pydantic, FastAPI or Redis client: the verifier
engine and its benchmark must import and start without them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# None in sys.modules is how Python itself marks a module as absent: imports fail, find_spec says None.
BLOCK = """
import sys
for name in ('pydantic', 'pydantic_core', 'pydantic_settings', 'fastapi', 'starlette', 'redis', 'httpx',
             'uvicorn', 'prometheus_client'):
    sys.modules[name] = None
"""


def test_verifier_benchmark_runs_without_the_web_stack() -> None:
    args = ["verifier.py", "--config", "tiny", "--images", "2", "--questions", "2", "--px", "56", "--repeat", "1"]
    code = BLOCK + f"import runpy; sys.argv = {args!r}; runpy.run_path('bench/verifier.py', run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["speedup"] > 0 and result["max_abs_diff"] <= 1e-4


def test_the_block_really_blocks() -> None:
    out = subprocess.run([sys.executable, "-c", BLOCK + "import dvreward_protocol.questions"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr
