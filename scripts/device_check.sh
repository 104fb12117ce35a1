#!/usr/bin/env bash
# One command for a GPU machine: GPU tests (the contract properties included), the worst ulp
# errors of the kernels, the gradient check on the cupy backend, the GPU benchmark and the kernel
# variants of tune_gpu.py (at most 150 + 120 + 60 + 60 + 60 + 180 + 200 s). Logs go to $OUT (or ./device_check_out). Needs CuPy, numpy, pytest and hypothesis
# (torch optional, as a benchmark peer); uses cupy_sce from this checkout.
#   PYTHON=python3 bash scripts/device_check.sh [extra bench.py arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_check_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
status=0
echo "== GPU tests"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cupy_backend.py tests/test_semantics.py \
  tests/test_family.py tests/test_contract.py -k "cupy" >"$OUT/gpu_tests.log" 2>&1 || status=1
echo "== framework bridges on the GPU (streams, CUDA graph capture)"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_torch.py tests/test_paddle.py \
  -k "cuda or gpu" >>"$OUT/gpu_tests.log" 2>&1 || status=1
echo "== scaling out on the GPU (Dask with CuPy chunks, a one-GPU NCCL communicator)"
timeout 60 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_dask.py tests/test_distributed.py \
  -k "cupy or nccl" >>"$OUT/gpu_tests.log" 2>&1 || status=1
tail -15 "$OUT/gpu_tests.log"
echo "== accuracy (cupy; the README's ulp table)"
timeout 60 "$PY" scripts/accuracy.py --backends cupy --problems 200 >"$OUT/accuracy_cupy.log" 2>&1 || status=1
cat "$OUT/accuracy_cupy.log"
echo "== gradient check (cupy)"
timeout 60 "$PY" scripts/gradcheck.py --backend cupy >"$OUT/gradcheck_cupy.log" 2>&1 || status=1
tail -3 "$OUT/gradcheck_cupy.log"
echo "== GPU benchmark"
timeout 180 "$PY" scripts/bench.py --device gpu --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_gpu.log" || status=1
echo "== kernel variants"
timeout 200 "$PY" scripts/tune_gpu.py --out "$OUT" 2>&1 | tee "$OUT/tune_gpu.log" || status=1
echo "== exit status $status"
exit $status
