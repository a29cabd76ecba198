#!/usr/bin/env bash
# What one call of the GPU machine runs (it has torch, nvcc, cmake, ninja and no network), in order:
# build; CUDA test suite; 16-byte access check in the SASS; compute-sanitizer memcheck on a small
# sweep; the benchmark. Logs and benchmark files go to $OUT (the device tool fetches them).
#   OUT=/tmp/out bash tools/gpu_session.sh [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 VLLM_MLA_OPS_TARGET=cuda
status=0

step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/machine.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$out/machine.txt"

step "build"
if ! python3 -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  exit 1
fi
grep -E "building target" "$out/build.log"

step "tests"
python3 -m pytest -q -rs "$@" 2>&1 | tee "$out/pytest.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "SASS: global loads/stores of the concat kernels"
so=$(ls vllm_mla_ops/_C*.so)
cuobjdump -sass "$so" | grep -oE "(LDG|STG)\.E[.A-Z0-9_]*" | sort | uniq -c | tee "$out/sass_ldst.txt"

step "compute-sanitizer memcheck (the CUDA contract tests)"
compute-sanitizer --tool memcheck --error-exitcode 3 \
  python3 -m pytest -q -x -k cuda tests/test_concat_mla_q.py >"$out/memcheck.log" 2>&1
echo "memcheck exit code $?" | tee -a "$out/memcheck.log"
tail -4 "$out/memcheck.log"

step "benchmark"
python3 tools/benchmark.py --out "$out" ${BENCH_ARGS:-} 2>&1 | tee "$out/benchmark.log" | tail -80
exit $status
