#!/usr/bin/env python
"""Where a call's time goes on a GPU: host (Python) time and device time per call, and the host
functions that take it.

    python scripts/profile_gpu.py [--calls N] [--top N]

For each case, ``cupyx.profiler.benchmark`` gives the host time of a call and the device time
between its first and last kernel; a call is host-bound where the first exceeds the second.
Then ``cProfile`` over N calls lists the host functions with the most cumulative time.
"""
import argparse
import cProfile
import os
import pstats
import sys

import numpy

import cupy_sce

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

CASES = [  # (name, shape, axis, dtype, call keywords, op)
    ('65536x1000 forward', (65536, 1000), -1, numpy.float32, {}, 'forward'),
    ('1048576x10 forward', (1048576, 10), -1, numpy.float32, {}, 'forward'),
    ('64x1000x256 axis=1 forward', (64, 1000, 256), 1, numpy.float32, {}, 'forward'),
    ('4096x32000 forward+backward', (4096, 32000), -1, numpy.float32, {}, 'forward_backward'),
    ('4096x32000 forward+backward mean', (4096, 32000), -1, numpy.float32, {'reduction': 'mean'},
     'forward_backward'),
    ('4096x32000 forward+backward mean, all features', (4096, 32000), -1, numpy.float32,
     {'reduction': 'mean', 'weight': True, 'label_smoothing': 0.1, 'z_loss': 1e-4, 'softcap': 30.0},
     'forward_backward'),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--calls', type=int, default=200)
    parser.add_argument('--top', type=int, default=12)
    args = parser.parse_args(argv)
    import cupy
    from cupyx.profiler import benchmark
    for name, shape, axis, dtype, kw, op in CASES:
        x, label = bench.make_inputs(cupy, shape, axis, dtype)
        kw = dict(kw)
        if kw.pop('weight', False):
            kw['weight'] = cupy.asarray(numpy.linspace(0.5, 2.0, shape[axis], dtype=numpy.float32))
        fn = getattr(cupy_sce, op)

        def call(fn=fn, x=x, label=label, axis=axis, kw=kw):
            return fn(x, label, axis=axis, **kw)
        for check in (True, False):
            with cupy_sce.label_check(check):
                result = benchmark(call, n_repeat=args.calls, n_warmup=10)
            print('{:<48} label check {:<5}: host {:7.1f} us, device {:7.1f} us a call'.format(
                name, str(check), float(numpy.median(result.cpu_times)) * 1e6,
                float(numpy.median(result.gpu_times[0])) * 1e6), flush=True)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            call()
        cupy.cuda.runtime.deviceSynchronize()
        profile.disable()
        stats = pstats.Stats(profile, stream=sys.stdout)
        stats.sort_stats('cumulative').print_stats(args.top)
        del x, label
        bench.free_device_memory()
    return 0


if __name__ == '__main__':
    sys.exit(main())
