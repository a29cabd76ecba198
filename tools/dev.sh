#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs torch and the build and test tools,
# builds the extension into it (CPU kernels, plus CUDA kernels where nvcc is found; see setup.py),
# then runs a job:
#   bash tools/dev.sh test [pytest args]   the test suite
#   bash tools/dev.sh main [bench args]    DeepSeek-V3 decode/prefill shapes vs torch.cat and the
#                                          same-bytes ceilings, on the best device
# Environment: PYTHON (default python3), VENV (default .venv), TORCH_SPEC (default torch==2.14.1;
# a CPU-only machine can take a CPU build, e.g. torch==2.13.0+cpu), plus the build knobs in setup.py
# (VLLM_MLA_OPS_TARGET, TORCH_CUDA_ARCH_LIST, MAX_JOBS). The CMake build folder under build/
# persists, so a re-run recompiles only what changed.
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
echo "dev.sh: installing ${TORCH_SPEC:-torch==2.14.1} and the build and test tools into $venv" >&2
"$py" -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.14.1}" \
  "setuptools>=77" packaging "cmake>=3.26" ninja pytest hypothesis numpy
echo "dev.sh: building vllm_mla_ops into $venv (pip install --no-build-isolation -e .)" >&2
"$py" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
"$py" - <<'PY'
import vllm_mla_ops as m
i = m.build_info()
archs = f", CUDA {i['cuda']} archs {i['cuda_arch_list']}" if i["cuda"] else ""
print(f"vllm_mla_ops {m.__version__}: target={i['target']}, torch floor {i['torch_floor']}, "
      f"built with torch {i['built_with_torch']}{archs}")
PY

if [ "$job" = test ]; then
  exec "$py" -m pytest -q "$@"
fi
exec "$py" benchmarks/main.py "$@"
