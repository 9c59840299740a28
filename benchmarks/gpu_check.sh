#!/usr/bin/env bash
# The engine's check on a GPU machine (no network, nothing installed): build the
# extension in place with the distribution's compiler, run the test suite, then
# print one table of speed ratios (benchmarks/gpu_bench.py: distance ops, channel_stats
# vs var_mean, FeatureStats on a ResNet-50, transferability end to end). When $OUT is
# set, the table and the build log are also written there. Under 5 minutes on an H200.
#
#   bash benchmarks/gpu_check.sh          (from any directory)
set -euo pipefail
cd "$(dirname "$0")/.."

# The default CXX on the GPU machine is a wrapper that breaks C++ exceptions (every
# TORCH_CHECK becomes a segmentation fault): build with the distribution's compiler.
export CXX=g++ CC=gcc MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
# Fail the build rather than silently leave the CUDA kernels out.
export TRANSFER_FAST_CUDA=1
PY=python3
LOGS=${OUT:-$(mktemp -d)}
mkdir -p "$LOGS"

step() { printf '\n== %s\n' "$*"; }

step "environment"
"$PY" -c 'import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible")'
command -v nvcc >/dev/null && nvcc --version | tail -n 1
"$CXX" --version | sed -n 1p

step "build: $PY setup.py build_ext --inplace (log: $LOGS/gpu_build.log)"
start=$SECONDS
if ! "$PY" setup.py build_ext --inplace >"$LOGS/gpu_build.log" 2>&1; then
  tail -n 80 "$LOGS/gpu_build.log"
  echo "build failed" >&2
  exit 1
fi
grep -A3 "transfer_fast build configuration" "$LOGS/gpu_build.log" || true
echo "built in $((SECONDS - start)) s"
"$PY" -c 'from transfer_fast.ops import _library as _ext
ops = ("multi_tensor_distance", "packed_distance", "channel_stats")
missing = [op for op in ops if not _ext.has_kernel("CUDA", op)]
raise SystemExit(f"CUDA kernels missing: {missing} ({_ext.reason})" if missing else 0)'

step "tests: $PY -m pytest -q tests"
xdist=()
if "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n 8); fi
start=$SECONDS
# A failing test must not hide the benchmark table: the status is returned at the end.
tests_status=0 bench_status=0
"$PY" -m pytest -q -p no:cacheprovider ${xdist[@]+"${xdist[@]}"} tests || tests_status=$?
echo "tests took $((SECONDS - start)) s (status $tests_status)"

step "benchmark: benchmarks/gpu_bench.py"
start=$SECONDS
table=()
if [[ -n "${OUT:-}" ]]; then table=(--table "$OUT/gpu_table.txt"); fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/gpu_bench.py ${table[@]+"${table[@]}"} \
  || { echo "gpu_bench failed (see above)"; bench_status=1; }
echo "benchmark took $((SECONDS - start)) s"

step "benchmark: benchmarks/score_bench.py (ScoreStats vs in-memory numpy)"
scores=()
if [[ -n "${OUT:-}" ]]; then scores=(--table "$OUT/score_table.txt"); fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/score_bench.py ${scores[@]+"${scores[@]}"} \
  || { echo "score_bench failed (see above)"; bench_status=1; }

exit $((tests_status != 0 || bench_status != 0))
