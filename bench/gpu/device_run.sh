#!/usr/bin/env bash
# Runs THERE, in the repo root, as the LAST device call (bench/gpu/README.md): stages the last part, unpacks
# and checks DALI, runs the GPU tests, then the benchmark with whatever time is left of --total-s, each
# step's results written under $OUT as they come (a call cut off at its limit still returns them):
#
#   $OUT/install.log     stage_part.sh and remote_install.sh: parts, unpack time, DALI's check on the GPU
#   $OUT/test_gpu.log    pytest -v -s of tests/test_gpu.py (what each test measured)
#   $OUT/test_gpu.xml    the same as JUnit XML
#   $OUT/gpu_bench.log   the benchmark's progress
#   $OUT/gpu_bench.json  every result, rewritten after each
#   $OUT/gpu_bench.md    the tables and the summary (baseline share, agreement, ratios)
#
# Usage: bash bench/gpu/device_run.sh [--total-s 400] [--tests-s 150] [--smoke]
#   --total-s  the whole script's time; the benchmark gets what the steps before it left, less a margin
#              for the configuration in flight and the last save (gpu_bench.py --grace-s)
#   --tests-s  the GPU tests' limit (pytest is killed past it; its log so far is kept)
#   --smoke    here, without a GPU: the scratch folders of stage_part/remote_install --smoke, the GPU tests'
#              dry run on the CPU (TARIMG_GPU_TESTS_ON_CPU=1), gpu_bench.py --smoke
set -uo pipefail
total=400 tests_s=150 smoke=0
while [ $# -gt 0 ]; do
  case "$1" in
    --total-s) total="$2"; shift 2 ;;
    --tests-s) tests_s="$2"; shift 2 ;;
    --smoke) smoke=1; shift ;;
    *) echo "device_run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
t0=$SECONDS
OUT="${OUT:-/tmp/device-run-out}"
mkdir -p "$OUT"
PY="${TARIMG_PYTHON:-python3}"
flag=()
[ "$smoke" = 1 ] && flag=(--smoke)
export PYTHONUNBUFFERED=1

bash bench/gpu/stage_part.sh "${flag[@]}" > "$OUT/install.log" 2>&1
# shellcheck source=/dev/null
source bench/gpu/remote_install.sh "${flag[@]}" >> "$OUT/install.log" 2>&1
rc=$?
cat "$OUT/install.log"
if [ "$rc" -ne 0 ]; then
  echo "device_run: install failed (rc $rc): see above" >&2
  exit "$rc"
fi
echo "device_run: installed at $((SECONDS - t0)) s"

test_env=()
[ "$smoke" = 1 ] && test_env=(TARIMG_GPU_TESTS_ON_CPU=1)
env "${test_env[@]}" timeout -k 10 "$tests_s" "$PY" -m pytest --noconftest -p no:cacheprovider -v -s -rs \
  --junitxml="$OUT/test_gpu.xml" tests/test_gpu.py > "$OUT/test_gpu.log" 2>&1
tests_rc=$?
# (DALI prints its decode errors, in colour, on the lines of the tests that expect them: cut those off)
sed -E 's/\x1b\[[0-9;]*m\[ERROR\].*$//' "$OUT/test_gpu.log" \
  | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^(GPU|orientation|resize|[0-9]+ (bad|threads)|the SOF|SIGSEGV)" | cut -c1-400
echo "device_run: GPU tests rc $tests_rc at $((SECONDS - t0)) s"

grace=45
budget=$((total - (SECONDS - t0) - grace - 15))
if [ "$budget" -lt 20 ]; then
  echo "device_run: $budget s left for the benchmark: skipped" | tee "$OUT/gpu_bench.log"
  exit "$tests_rc"
fi
export MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456
timeout -k 5 $((budget + grace + 10)) "$PY" bench/gpu/gpu_bench.py "${flag[@]}" --out "$OUT" \
  --budget-s "$budget" --grace-s "$grace" > "$OUT/gpu_bench.log" 2>&1
bench_rc=$?
grep -vE "ERROR|jpeg_parser|libjpeg_turbo|^Note:|nvjpeg2k|nvtiff" "$OUT/gpu_bench.log" | tail -40 | cut -c1-300
echo "device_run: benchmark rc $bench_rc (budget $budget s) at $((SECONDS - t0)) s"
sed -n '/^## /,/^| case/p' "$OUT/gpu_bench.md" 2>/dev/null | grep -v "^| case" | cut -c1-600
echo "device_run: done in $((SECONDS - t0)) s: tests rc $tests_rc, benchmark rc $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
