"""The GPU machines have torch and transformers but no pydantic, FastAPI or Redis client: the verifier
engine and its benchmark must import and start without them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_batch_noise_benchmark_runs_without_the_web_stack() -> None:
    args = ["batch_noise.py", "--config", "tiny", "--images", "2", "--questions", "2", "--px", "56"]
    code = BLOCK + f"import runpy; sys.argv = {args!r}; runpy.run_path('bench/batch_noise.py', run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["float32_packed_max_abs_shift"] <= 1e-4 and result["float32_per_pair_max_abs_shift"] <= 1e-4
    assert 0 < result["bfloat16_vs_float32_max_abs_diff"] < 0.5  # bf16 rounds: some difference, not garbage


WEB = ('fastapi', 'starlette', 'redis', 'pydantic_settings', 'uvicorn', 'prometheus_client')


@pytest.mark.parametrize(("modules", "blocked"), [
    # the verifiers need neither pydantic nor the web stack (the remote one needs httpx, its HTTP client)
    (["server.engines.vllm.verifier", "server.engines.hf.verifier"], (*WEB, "pydantic", "pydantic_core", "httpx")),
    (["server.engines.remote.verifier"], (*WEB, "pydantic", "pydantic_core")),
    # the decomposers validate with pydantic models, but import no web stack
    (["server.engines.vllm.decomposer", "server.engines.remote.decomposer", "server.engines.hf.decomposer"], WEB),
])
def test_engines_import_without_the_web_stack(modules: list[str], blocked: tuple[str, ...]) -> None:
    """vLLM itself is optional: the vLLM engines import it only when a model is loaded."""
    code = (f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
            + "".join(f"import {m}\n" for m in modules) + "print(sorted(set(sys.modules) & {'vllm'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
