#!/usr/bin/env bash
# One short run on a GPU machine that checks and times the Triton kernels:
#   1. the GPU test tier (pytest -m gpu, compiled kernels, FASTAE_GPU_TESTS=1),
#   2. the kernel benchmarks (python -m fastae.bench) in fp32 and bf16.
# Everything goes to one folder, $1 (default benchmarks/results/gpu-<UTC date>), so that the
# folder can be committed as the record of the run. The whole script stays under 8 minutes:
# each step has its own `timeout`, and a step that fails or times out does not stop the next.
#
# Usage: benchmarks/gpu_check.sh [OUT_DIR]      (from the repository root; PYTHON overrides the
#                                                interpreter, default .venv/bin/python or python3)
set -u

cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# Without a CUDA device there is nothing to check: say so first, in summary.txt and on stdout,
# and fail (exit 3: no device; exit 4: torch itself does not import with $PYTHON).
"$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" \
    > "$OUT/cuda-check.txt" 2>&1
CUDA_RC=$?
if [ "$CUDA_RC" -ne 0 ]; then
    if [ "$CUDA_RC" -eq 3 ]; then
        echo "no CUDA device: GPU tests skipped, benchmarks not run" | tee "$OUT/summary.txt"
        echo "($PYTHON: torch.cuda.is_available() is False)" | tee -a "$OUT/summary.txt"
        echo "results in $OUT" | tee -a "$OUT/summary.txt"
        exit 3
    fi
    echo "torch does not import with $PYTHON: GPU tests skipped, benchmarks not run" \
        | tee "$OUT/summary.txt"
    echo "(see $OUT/cuda-check.txt)" | tee -a "$OUT/summary.txt"
    exit 4
fi
# A GPU machine that has torch and triton but not fastae (machines without network access
# included): install this checkout in place, without dependencies or a build environment.
if ! (cd /tmp && "$PYTHON" -c "import fastae.kernels" 2>/dev/null); then
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1 \
        || echo "fastae: install failed, see $OUT/install.txt"
fi
# The GPU tier runs most tests in torch's deterministic mode (one kernel configuration); cuBLAS
# needs this workspace setting to be deterministic there.
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
# Test and benchmark budgets (seconds): 300 + 150 + ~10 for the environment report < 480.
TEST_TIMEOUT="${TEST_TIMEOUT:-300}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-150}"

# The machine, for the record.
{
    date -u
    git rev-parse HEAD 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available() and \
torch.cuda.get_device_name())" 2>&1
} > "$OUT/environment.txt"

# 1. GPU test tier.
FASTAE_GPU_TESTS=1 timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest -m gpu tests/ -rA \
    --junitxml="$OUT/gpu-tests.xml" > "$OUT/gpu-tests.txt" 2>&1
TEST_RC=$?
# pytest's closing line, e.g. "==== 40 passed, 2 skipped, 900 deselected in 61.2s ====".
TEST_LAST=$(grep -E '^=+ .* in [0-9.]+s' "$OUT/gpu-tests.txt" | tail -n 1)
count() {
    local n
    n=$(printf '%s\n' "$TEST_LAST" | grep -Eo "[0-9]+ $1" | grep -Eo '^[0-9]+')
    echo "${n:-0}"
}
{
    echo "gpu tests: $(count passed) passed, $(count failed) failed, $(count skipped) skipped," \
        "$(count 'errors?') errors; exit $TEST_RC (124 = timed out after ${TEST_TIMEOUT}s)"
    [ -n "$TEST_LAST" ] || echo "gpu tests: no pytest summary line in $OUT/gpu-tests.txt"
} | tee "$OUT/summary.txt"
# The cost of a denoising encoder step against a clean one (printed by tests/test_gpu.py).
grep -h "denoising step" "$OUT/gpu-tests.txt" | sort -u | tee -a "$OUT/summary.txt"

# 2. Kernel benchmarks.
if "$PYTHON" -c "import importlib.util, sys; \
sys.exit(importlib.util.find_spec('fastae.bench') is None)" 2>/dev/null; then
    timeout "$BENCH_TIMEOUT" "$PYTHON" -m fastae.bench --device cuda --dtype fp32,bf16 \
        --out "$OUT" > "$OUT/bench.txt" 2>&1
    BENCH_RC=$?
    echo "benchmarks: exit $BENCH_RC (124 = timed out after ${BENCH_TIMEOUT}s)" \
        | tee -a "$OUT/summary.txt"
else
    BENCH_RC=2
    echo "benchmarks: NOT RUN: module fastae.bench not found (python -m fastae.bench)" \
        | tee -a "$OUT/summary.txt" "$OUT/bench.txt"
fi

echo "results in $OUT" | tee -a "$OUT/summary.txt"
[ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
