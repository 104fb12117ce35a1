#!/usr/bin/env bash
# One command for a GPU machine: GPU tests, the gradient check on the cupy backend and the GPU
# benchmark (at most 120 + 45 + 120 s). Logs go to $OUT (or ./device_check_out). Needs CuPy, numpy, pytest
# (torch optional, as a benchmark peer); installs cupy_sce from this checkout without deps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
status=0
echo "== GPU tests"
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_cupy_backend.py tests/test_semantics.py -k "cupy" \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -5 || status=1
echo "== gradient check (cupy)"
timeout 45 python scripts/gradcheck.py --backend cupy >"$OUT/gradcheck_cupy.log" 2>&1 || status=1
tail -1 "$OUT/gradcheck_cupy.log"
echo "== GPU benchmark"
timeout 120 python scripts/bench.py --device gpu --out "$OUT" 2>&1 | tee "$OUT/bench_gpu.log" | tail -40 || status=1
exit $status
