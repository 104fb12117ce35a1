#!/usr/bin/env python
"""Compile every kernel module for the current GPU in parallel processes, before a GPU session.

    python scripts/precompile.py [--jobs N] [--knobs]

The backend compiles a module (one operation and feature set of a dtype, ``_kernels.modules``)
when it first launches one of its kernels, one at a time and a few seconds each: a test run
that touches them all would spend minutes in NVRTC.  Each module compiled here lands in CuPy's
on-disk kernel cache (``CUPY_CACHE_DIR``), where the backend's own compile then finds it: the
cache key is the source, the options, the names and the device's architecture, all the same.
``--knobs`` also compiles the featureless forward and forward+backward modules with the options
of each ``scripts/tune_gpu.py`` variant.
"""
import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import time

from cupy_sce import _kernels

DTYPES = ('float16', 'bfloat16', 'float32', 'float64')
KNOB_DTYPES = ('float16', 'bfloat16', 'float32')  # what tune_gpu.py times


def jobs(knobs):
    """(dtype, extra NVRTC options, names) of every module to compile."""
    found = [(dtype, (), tuple(names)) for dtype in DTYPES for names in _kernels.modules(dtype).values()]
    if knobs:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import tune_gpu
        option_sets = sorted({tuple(options) for _, options, _ in tune_gpu.VARIANTS if options})
        for options in option_sets:
            for dtype in KNOB_DTYPES:
                for (op, features), names in ((k, v) for k, v in _kernels.modules(dtype).items()
                                              if isinstance(k, tuple)):
                    if features == 0 and op in (_kernels.OPS['forward'], _kernels.OPS['forward_backward']):
                        found.append((dtype, options, tuple(names)))
    return found


def compile_one(job):
    dtype, options, names = job
    start = time.perf_counter()
    _kernels.raw_module(dtype, options, names).compile()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--jobs', type=int, default=os.cpu_count(), help='compiling processes')
    parser.add_argument('--knobs', action='store_true', help="also tune_gpu.py's variants")
    args = parser.parse_args(argv)
    todo = jobs(args.knobs)
    start = time.perf_counter()
    # spawned workers: each makes its own CUDA context (a forked one would inherit none that works)
    context = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        seconds = list(pool.map(compile_one, todo))
    print('# compiled {} modules in {:.1f} s ({} processes; {:.1f} s of compiling, longest {:.1f} s)'.format(
        len(todo), time.perf_counter() - start, args.jobs, sum(seconds), max(seconds)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
