#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs the CUDA build of torch and the build
# and test tools, builds the extension (CPU + CUDA where nvcc is found), then runs a job:
#   bash tools/dev.sh test [pytest args]   the test suite (what CI runs)
#   bash tools/dev.sh main [bench args]    DeepSeek-V3 decode/prefill shapes vs torch.cat, best device
# Environment: PYTHON (default python3), VENV (default .venv), TORCH_SPEC (default torch==2.14.1),
# plus the build knobs in setup.py (VLLM_MLA_OPS_TARGET, TORCH_CUDA_ARCH_LIST, MAX_JOBS).
set -euo pipefail
cd "$(dirname "$0")/.."

job="${1:-test}"
shift || true
case "$job" in test|main) ;; *) echo "usage: bash tools/dev.sh test|main [args]" >&2; exit 2 ;; esac

venv="${VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.14.1}" \
  setuptools packaging cmake ninja pytest hypothesis numpy
"$py" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .

if [ "$job" = test ]; then
  exec "$py" -m pytest -q "$@"
fi
exec "$py" benchmarks/main.py "$@"
