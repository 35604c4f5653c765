"""The trainer client installed alone: its own distribution, httpx + pydantic, no `server` module.

A fresh venv gets the `client/` wheel plus exactly the distributions httpx and pydantic need (linked
from this interpreter, nothing downloads); a trainer's working directory holds its own `server.py`
that raises on import; the client scores against a running service from there.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}  # no PYTHONPATH to this checkout

SCRIPT = """
import importlib.util, json, sys
import trainer_client
from trainer_client import DVRewardClient

assert importlib.util.find_spec("server").origin.endswith("work/server.py")  # the trainer's own module
with DVRewardClient(sys.argv[1]) as client:
    result = client.score(["a red cube"], [[open("image.png", "rb").read()]], questions=[json.loads(sys.argv[2])])
print(json.dumps({"rewards": result.flat_rewards(), "modules": sorted(m for m in sys.modules if m.split(".")[0]
                  in ("server", "trainer_client", "dvreward_protocol")), "file": trainer_client.__file__}))
"""


def _closure(*names: str) -> set[str]:
    """The installed distributions `names` need (requirements without extras, transitively)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        dist = metadata.distribution(todo.pop())
        if dist.metadata["Name"].lower() in seen:
            continue
        seen.add(dist.metadata["Name"].lower())
        for req in dist.requires or ():
            name, _, marker = req.partition(";")
            if "extra" not in marker and "python_version < " not in marker:
                todo.append(re.match(r"[A-Za-z0-9._-]+", name.strip()).group(0))
    return seen


def _link_dependencies(deps: Path) -> None:
    """Link the top-level modules of httpx's and pydantic's distributions into `deps` (and nothing else)."""
    deps.mkdir()
    for name in _closure("httpx", "pydantic"):
        for f in metadata.distribution(name).files or ():
            top = f.parts[0]
            src = Path(f.locate()).parents[len(f.parts) - 1] / top
            if ".dist-info" not in top and top != ".." and not (deps / top).exists() and src.exists():
                (deps / top).symlink_to(src)


def test_client_installs_and_scores_alone_beside_a_trainers_own_server_py(service_url, tmp_path, questions):
    wheels, source = tmp_path / "wheels", tmp_path / "client"
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))  # links followed:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], check=True, capture_output=True)  # the build leaves the checkout as it was
    (wheel,) = wheels.glob("dvreward_client-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               env=CLEAN_ENV, check=True, capture_output=True, text=True).stdout.strip())
    _link_dependencies(tmp_path / "deps")
    (site / "deps.pth").write_text(str(tmp_path / "deps") + "\n")

    installed = {p.name for p in site.iterdir()}
    assert {"trainer_client", "dvreward_protocol"} <= installed and "server" not in installed
    elsewhere = subprocess.run([str(python), "-c", "import importlib.util; print(importlib.util.find_spec('server'))"],
                               cwd=tmp_path, env=CLEAN_ENV, check=True, capture_output=True, text=True)
    assert elsewhere.stdout.strip() == "None"  # the environment has no `server` module at all

    work = tmp_path / "work"
    work.mkdir()
    (work / "server.py").write_text("raise ImportError('the trainer\\'s own server.py was imported')\n")
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), (200, 30, 30), dtype=np.uint8)).save(buf, "PNG")
    (work / "image.png").write_bytes(buf.getvalue())
    (work / "score.py").write_text(SCRIPT)
    run = subprocess.run([str(python), "score.py", service_url, json.dumps(questions)], cwd=work, env=CLEAN_ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert len(out["rewards"]) == 1 and 0.0 < out["rewards"][0] < 1.0
    assert out["file"].startswith(str(site)) and not any(m.split(".")[0] == "server" for m in out["modules"])


def test_dvreward_script_without_server_dependencies_says_what_to_install():
    run = subprocess.run([sys.executable, "-c", "import sys; sys.modules['pydantic_settings'] = None\n"
                          "from server.cli import main\nsys.exit(main(['serve']))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "no module 'pydantic_settings'" in run.stderr and "pip install 'dvreward[server]'" in run.stderr
