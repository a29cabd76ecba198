#!/usr/bin/env bash
# What one call of the GPU machine runs (it has torch, nvcc, cmake, ninja and no network), in order:
# build; the whole test suite; the global loads/stores in the SASS; compute-sanitizer (memcheck,
# racecheck, initcheck) over the CUDA contract tests and a sample of hypothesis-drawn CUDA inputs;
# the bf16 benchmark, then the fp8 one. pytest.log, benchmark.log and the benchmarks' CSV, JSON and
# PNG files go to $OUT (the device tool brings back at most 8 files).
#   OUT=/tmp/out bash tools/gpu_session.sh [pytest args...]
# BENCH_ARGS: extra arguments of the bf16 benchmark; FP8_BENCH_ARGS: of the fp8 one. STEPS picks
# the steps after the build (default "tests sanitizers bench bench_fp8"), to split a session over
# calls of the 10-minute limit; SANITIZERS the compute-sanitizer tools (default "memcheck racecheck
# initcheck"), each over every selected test (no -x: a failed test does not hide the rest).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 VLLM_MLA_OPS_TARGET=cuda
status=0

step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

step "build"
if ! python3 -m pip install --no-build-isolation --no-deps -e . >/tmp/build.log 2>&1; then
  tail -40 /tmp/build.log
  exit 1
fi
grep -E "building target" /tmp/build.log

steps=" ${STEPS:-tests sanitizers bench bench_fp8} "
want() { [[ "$steps" == *" $1 "* ]]; }

if want tests; then
step "tests"
python3 -m pytest -q -rs "$@" 2>&1 | tee "$out/pytest.log" | tail -12
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "SASS: global loads/stores of the concat kernels"
cuobjdump -sass vllm_mla_ops/_C*.so | grep -oE "(LDG|STG)\.E[.A-Z0-9_]*" | sort | uniq -c
fi

if want sanitizers; then
for tool in ${SANITIZERS:-memcheck racecheck initcheck}; do
  step "compute-sanitizer $tool (CUDA contract tests, fp8 tests, hypothesis sample)"
  HYPOTHESIS_PROFILE=ci compute-sanitizer --tool "$tool" --error-exitcode 3 \
    python3 -m pytest -q -rfs -k cuda tests/test_concat_mla_q.py tests/test_fp8.py tests/test_properties.py \
    >/tmp/sanitizer.log 2>&1
  echo "$tool exit code $?"
  grep -E "^(FAILED|SKIPPED)|ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" /tmp/sanitizer.log | tail -12
done
fi

if want bench; then
step "benchmark: concat_mla_q"
python3 tools/benchmark.py --out "$out" ${BENCH_ARGS:-} 2>&1 | tee "$out/benchmark.log" | tail -45
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want bench_fp8; then
step "benchmark: concat_mla_q_fp8"
python3 tools/benchmark.py --fp8 --out "$out" ${FP8_BENCH_ARGS:-} 2>&1 | tee -a "$out/benchmark.log" | tail -45
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
exit $status
