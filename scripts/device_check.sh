#!/usr/bin/env bash
# One command for a GPU machine, at most 10 minutes: the kernel modules compiled in parallel, the
# GPU benchmark, the GPU tests (the contract properties, the loss family, bfloat16, the bridges,
# Dask with CuPy chunks, a one-GPU NCCL communicator), the kernel variants of tune_gpu.py, the
# worst ulp errors and the gradient check on the cupy backend.  Each section has its own time
# limit (seconds, below), so that one that hangs costs only its own results.  Logs go to $OUT (or
# ./device_check_out; at most 8 files, what a device call brings back).  Needs CuPy, numpy, pytest,
# hypothesis and ml_dtypes (pytest-xdist and pytest-timeout speed the tests up and are used when
# present; torch optional, as a peer; dask/distributed for their tests: wheels in .whl are
# installed first when present); uses cupy_sce from this checkout.
#   PYTHON=python3 bash scripts/device_check.sh [section ...]   (default: all, in this order)
# sections: compile bench tests profile ncu tune accuracy gradcheck
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_check_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# CuPy's compiled kernels, inside the checkout: a warm machine keeps them between calls
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-$PWD/.cupy_cache}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
sections="${*:-compile bench tests profile ncu tune accuracy gradcheck}"
status=0
section() { case " $sections " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
stamp() { echo "== $(date +%T) $*"; }
if section compile; then
  stamp "kernel modules, compiled in parallel (the tests and tune_gpu.py then find them cached)"
  knobs=""; if section tune; then knobs=--knobs; fi  # tune_gpu.py's variants too
  timeout 100 "$PY" scripts/precompile.py $knobs 2>&1 | tail -5 || status=1
fi
if section bench; then
  stamp "GPU benchmark"
  timeout 170 "$PY" scripts/bench.py --device gpu --out "$OUT" 2>&1 | tee "$OUT/bench_gpu.log" || status=1
fi
if section tests; then
  stamp "GPU tests (a line per test in gpu_tests.log, so that a run cut short still says what passed)"
  parallel=""; "$PY" -c "import xdist" 2>/dev/null && parallel="-n 8"
  "$PY" -c "import pytest_timeout" 2>/dev/null && parallel="$parallel --timeout 90"
  timeout 130 "$PY" -m pytest -v -p no:cacheprovider -rfEs $parallel tests/test_cupy_backend.py \
    tests/test_semantics.py tests/test_family.py tests/test_contract.py tests/test_linear.py \
    tests/test_torch.py tests/test_dask.py tests/test_distributed.py \
    -k "cupy or gpu or cuda or nccl" >"$OUT/gpu_tests.log" 2>&1 || status=1
  grep -c PASSED "$OUT/gpu_tests.log"; grep -E "FAILED|ERROR" "$OUT/gpu_tests.log" | head -20; tail -3 "$OUT/gpu_tests.log"
fi
if section profile; then
  stamp "host and device time per call, and where the host time goes"
  timeout 90 "$PY" scripts/profile_gpu.py --calls 100 >"$OUT/profile_gpu.log" 2>&1 || status=1
  grep "label check" "$OUT/profile_gpu.log"
fi
if section ncu; then
  stamp "Nsight Compute on the float16 loss-only forward at 8192 x 128256 (where its time goes)"
  timeout 120 ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section InstructionStats --section MemoryWorkloadAnalysis \
    -k regex:cupy_sce_rows -s 1 -c 1 "$PY" -c "
import numpy, cupy, cupy_sce
x = (cupy.random.standard_normal((8192, 128256), dtype=numpy.float32) * 2).astype(numpy.float16)
label = cupy.random.randint(0, 128256, (8192, 1))
with cupy_sce.label_check(False):
    for _ in range(2):
        cupy_sce.forward(x, label)
cupy.cuda.runtime.deviceSynchronize()" >"$OUT/ncu.log" 2>&1 || status=1
  grep -E "Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Issued Ipc|Executed Ipc|Stall|stall|Warp Cycles|Block Limit|Executed Instructions" "$OUT/ncu.log" | head -40
fi
if section tune; then
  stamp "kernel variants ${TUNE_ARGS:-}"
  # TUNE_ARGS: e.g. --cases float16 --variants "lean pass 1"
  eval "timeout 130 \"\$PY\" scripts/tune_gpu.py --rounds 3 --out /tmp/tune_out ${TUNE_ARGS:-}" 2>&1 \
    | tee "$OUT/tune_gpu.log" || status=1
fi
if section accuracy; then
  stamp "accuracy (cupy; the README's ulp table)"
  timeout 45 "$PY" scripts/accuracy.py --backends cupy --problems 100 >"$OUT/accuracy_cupy.log" 2>&1 || status=1
  cat "$OUT/accuracy_cupy.log"
fi
if section gradcheck; then
  stamp "gradient check (cupy)"
  timeout 45 "$PY" scripts/gradcheck.py --backend cupy >"$OUT/gradcheck_cupy.log" 2>&1 || status=1
  tail -3 "$OUT/gradcheck_cupy.log"
fi
stamp "exit status $status"
exit $status
