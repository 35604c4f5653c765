"""The real-vLLM tests: skipped with a reason where vLLM is not installed, a failure where it must be.

CI runs them in the venv that scripts/vllm-cpu-env.sh builds, with DVREWARD_REQUIRE_VLLM=1, so a
broken vLLM install fails the run instead of silently skipping.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# On a CPU vLLM reserves this many GiB of KV cache per model (its default assumes a large server).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session", autouse=True)
def vllm_installed() -> None:
    if importlib.util.find_spec("vllm") is not None:
        return
    reason = ("vLLM is not installed in this environment. Build one with `scripts/vllm-cpu-env.sh VENV_DIR` "
              "and run `PYTHONPATH=$PWD VENV_DIR/bin/python -m pytest tests/server/vllm` (.ci/run does).")
    if os.environ.get("DVREWARD_REQUIRE_VLLM") == "1":
        pytest.fail("DVREWARD_REQUIRE_VLLM=1 but " + reason)
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shared_memory(vllm_installed: None) -> Iterator[None]:
    """vLLM's engine processes leave their shared-memory buffers behind when killed; remove the ones this session
    created that no live process maps, so repeated CI runs on one machine do not fill /dev/shm."""
    shm = Path("/dev/shm")
    before = set(shm.glob("psm_*"))
    yield
    deadline = time.monotonic() + 30  # engine processes ending right now may still map theirs
    while left := set(shm.glob("psm_*")) - before:
        mapped = _mapped()
        for segment in left:
            if segment.name not in mapped:
                segment.unlink(missing_ok=True)
        if time.monotonic() > deadline:
            break
        time.sleep(1)


def _mapped() -> str:
    """Every process's memory map that can be read, as one text."""
    out = []
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            out.append(maps.read_text())
        except OSError:  # a process that ended meanwhile, or one we may not read
            continue
    return "".join(out)
