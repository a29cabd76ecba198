#!/usr/bin/env bash
# Build, test and benchmark on a machine with NVIDIA GPUs (torch, nvcc, cmake and ninja installed;
# no network needed), in one command:
#   OUT=/tmp/out bash tools/gpu_session.sh [pytest args...]
# STEPS picks the steps after the build (default "tests large memcheck sass bench"; "large" runs the
# tests marked large, tens of GB of GPU memory); JOBS runs the tests step in that many processes
# (pytest-xdist); SANITIZERS the compute-sanitizer tools of the memcheck step (default memcheck), run
# over the CUDA tests of SANITIZED_TESTS (default: every file with CUDA kernels' tests).
# pytest.log, sanitizer.log, the benchmark tables (bench.md) and bench.tar.gz (every table, CSV and
# PNG) go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 VLLM_MLA_OPS_TARGET=cuda
status=0

step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }

step "machine"
nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'

step "build"
if ! python3 -m pip install --no-build-isolation --no-deps -e . >/tmp/build.log 2>&1; then
  tail -40 /tmp/build.log
  exit 1
fi
python3 -c 'import vllm_mla_ops as m; print(m.__version__, m.build_info())'

steps=" ${STEPS:-tests large memcheck sass bench} "
want() { [[ "$steps" == *" $1 "* ]]; }

if want tests; then
  step "tests"
  python3 -m pytest -q -rs -p no:cacheprovider ${JOBS:+-n "$JOBS"} "$@" 2>&1 | tee "$out/pytest.log" | tail -15
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want large; then
  step "tests marked large"
  python3 -m pytest -q -rs -p no:cacheprovider --run-large -m large tests 2>&1 | tee "$out/pytest_large.log" | tail -5
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want memcheck; then
  # The CUDA tests; reduce-overhead's cudagraph trees report pool tensors "not tracked as outputs"
  # under the sanitizer only (the plain run passes), so that one test is left to the plain run, and
  # the large-output cases of the width tests (millions of threads each, slow under the sanitizer)
  # too: their launch paths are the row-count tests', which do run here.
  # torch.compile's own compilation under the sanitizer takes minutes a test and runs no kernel of
  # ours that the eager tests do not, so the compiled tests are left to the plain run as well.
  SANITIZED="cuda and not reduce_overhead and not large-output and not compiled and not traced"
  for tool in ${SANITIZERS:-memcheck}; do
    step "compute-sanitizer $tool over the CUDA tests"
    compute-sanitizer --tool "$tool" --error-exitcode 3 python3 -m pytest -q -rfs -p no:cacheprovider -k "$SANITIZED" \
      ${SANITIZED_TESTS:-tests/test_valid_inputs.py tests/test_validation.py tests/test_cuda.py tests/test_properties.py \
      tests/test_hostile.py tests/test_concat_mla_rope.py tests/test_deepseek_example.py} \
      >"$out/sanitizer_$tool.log" 2>&1
    echo "$tool exit code $?"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$out/sanitizer_$tool.log" | tail -5
  done
fi

if want sass; then
  step "SASS: global loads/stores of the CUDA kernels"
  cuobjdump -sass vllm_mla_ops/_C_cuda.so | grep -oE "(LDG|STG)\.E[.A-Z0-9_]*" | sort | uniq -c
fi

if want bench; then
  # Every benchmark script with its defaults (main.py runs the same scripts on fewer shapes); all
  # their tables go to bench.md, every file they write to bench.tar.gz.
  bench=/tmp/bench
  rm -rf "$bench"
  : >"$out/bench.md"
  run_bench() {  # name, script, options...
    local name=$1; shift
    step "benchmark: $name"
    timeout 560 python3 "$@" --out "$bench/$name" 2>&1 | tail -80
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    cat "$bench/$name"/*.md >>"$out/bench.md" 2>/dev/null
  }
  run_bench concat_mla_q benchmarks/bench_concat_mla_q.py --bmm
  run_bench concat_mla_q_fp8 benchmarks/bench_concat_mla_q_fp8.py
  run_bench concat_mla_rope benchmarks/bench_concat_mla_rope.py
  run_bench host_time benchmarks/bench_host_time.py
  tar -czf "$out/bench.tar.gz" -C "$bench" .
fi
exit $status
