#!/usr/bin/env python
"""Time kernel variants on a GPU: the tuning knobs of kernels/sce.cu and the launch geometry.

    python scripts/tune_gpu.py [--repeat N] [--rounds N] [--out DIR]

Each variant compiles the kernels with its own ``-D`` options (``_kernels.TUNING_KNOBS``) or
replaces launch parameters of ``_cupy_backend``; it runs through the real
``CupyBackend`` host logic, its results are checked against the default variant's, and the
forward and fused forward+backward times are printed per case as ms and fraction of peak
bandwidth (the byte model of bench.py).  The defaults in sce.cu / _cupy_backend.py are what a
run of this picked.
"""
import argparse
import contextlib
import os
import statistics
import sys

import numpy

import cupy_sce
from cupy_sce import _cupy_backend, _kernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the byte model, inputs and timers are the benchmark's)

# (name, extra NVRTC options, {(object, attribute): value} replaced while the variant runs)
VARIANTS = [
    ('default', (), {}),
    ('clusters', (), {(_cupy_backend, 'USE_CLUSTERS'): True}),
] + [(knob, options, {}) for knob, options in _kernels.TUNING_KNOBS.items()] + [
    ('clusters x 512', (), {(_cupy_backend, 'USE_CLUSTERS'): True, (_cupy_backend, 'CLUSTER_BLOCK'): 512}),
    # a long row's segments cached across a cluster, each filled by the bulk copy engine
    ('clusters + bulk copy', _kernels.TUNING_KNOBS['bulk copy'], {(_cupy_backend, 'USE_CLUSTERS'): True}),
    # one CTA of 1024 threads per row, caching rows up to the opt-in maximum (K = 32000 float32)
    ('row cache 227 KiB x 1024', (), {(_cupy_backend, 'SHARED_LIMIT'): 227 * 1024,
                                      (_cupy_backend, 'GROUP_TABLE'): ((512, None), (1024, 32), (float('inf'), 1024))}),
    ('rows block 512', (), {(_cupy_backend, 'ROWS_BLOCK'): 512}),
    ('8 chunks a thread', (), {(_cupy_backend, 'CHUNKS_PER_THREAD'): 8}),
    ('columns: 4 warps', (), {(_cupy_backend, 'COLUMN_SLICES'): 4}),
    ('columns: 16 warps', (), {(_cupy_backend, 'COLUMN_SLICES'): 16}),
    ('columns: off', (), {(_cupy_backend, 'COLUMN_SLICES'): 1}),
]
CASES = [  # (name, shape, class axis, dtype)
    ('8192x128256', (8192, 128256), -1, numpy.float32), ('8192x128256', (8192, 128256), -1, numpy.float16),
    ('8192x128256', (8192, 128256), -1, 'bfloat16'),
    ('4096x32000', (4096, 32000), -1, numpy.float32), ('65536x1000', (65536, 1000), -1, numpy.float32),
    ('1048576x10', (1048576, 10), -1, numpy.float32),
    ('64x1000x256 axis=1', (64, 1000, 256), 1, numpy.float32)]
OPS = ('forward', 'forward+backward')


class VariantRuntime(_cupy_backend.CupyRuntime):
    """CupyRuntime whose kernels are compiled with extra options."""

    def __init__(self, options):
        super().__init__()
        self.options = tuple(options)
        self.modules = {}

    def kernel(self, dtype, name):
        dtype = numpy.dtype(dtype)
        key = (dtype, _kernels.module_key(name))  # compiled lazily, like the backend's modules
        if key not in self.modules:
            self.modules[key] = _kernels.raw_module(dtype, self.options, _kernels.modules(dtype)[key[1]])
        return self.modules[key].get_function(name)


@contextlib.contextmanager
def variant(runtime, overrides):
    saved = {key: getattr(*key) for key in overrides}
    for (obj, attr), value in overrides.items():
        setattr(obj, attr, value)
    try:
        with cupy_sce._api.use_backend(_cupy_backend.CupyBackend(runtime)):
            yield
    finally:
        for (obj, attr), value in saved.items():
            setattr(obj, attr, value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeat', type=int, default=5, help='timed calls per round (median)')
    parser.add_argument('--rounds', type=int, default=5,
                        help='rounds over all variants; a variant\'s time is its median round, so that '
                             'drift of the card (clocks, temperature) hits every variant alike')
    parser.add_argument('--out', default='bench_out')
    parser.add_argument('--cases', nargs='*', help='only the cases whose "name dtype" contains one of these')
    parser.add_argument('--variants', nargs='*', help='only the variants (and the default) named so')
    args = parser.parse_args(argv)
    variants = [v for v in VARIANTS if not args.variants or v[0] == 'default' or v[0] in args.variants]
    cases = [c for c in CASES if not args.cases
             or any(want in '{} {}'.format(c[0], c[3] if isinstance(c[3], str) else numpy.dtype(c[3]).name)
                    for want in args.cases)]
    import cupy
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 -- CuPy raises its own CUDARuntimeError without a GPU
        print('# no GPU: nothing to tune ({})'.format(exc))
        return 1
    peak = bench.peak_bandwidth_gbs()
    name = cupy.cuda.runtime.getDeviceProperties(0)['name']
    print('# {}, peak {:.0f} GB/s; median of {} rounds x median of {} calls'.format(
        name.decode() if isinstance(name, bytes) else name, peak, args.rounds, args.repeat))
    runtimes = {vname: VariantRuntime(options) for vname, options, _ in variants}
    lines, mismatches = [], []
    for case, shape, axis, dtype in cases:
        if dtype == 'bfloat16':  # ml_dtypes' (imported only here)
            dtype = bench.bfloat16_or_none()
            if dtype is None:
                continue
        x, label = bench.make_inputs(cupy, shape, axis, dtype)
        reference = None
        for vname, _, overrides in variants:  # each variant computes what the default computes
            with variant(runtimes[vname], overrides):
                loss, grad = cupy_sce.forward_backward(x, label, axis=axis)
            if reference is None:
                reference = (loss, grad)
                continue
            tol = {'float16': 2e-3, 'bfloat16': 1.6e-2}.get(numpy.dtype(dtype).name, 2e-6)
            err = max(float(abs(a.astype(numpy.float32) - b.astype(numpy.float32)).max())
                      for a, b in zip((loss, grad), reference))
            if not err <= tol:
                mismatches.append('{} {} {}: max abs diff {:.2e}'.format(
                    vname, case, numpy.dtype(dtype).name, err))
        del reference, loss, grad
        times = {}
        for _ in range(args.rounds):
            for vname, _, overrides in variants:
                with variant(runtimes[vname], overrides):
                    for op in OPS:
                        t = bench.time_gpu(bench.ours(op, x, label, axis), args.repeat)[0]
                        times.setdefault((vname, op), []).append(t)
        for vname, _, _ in variants:
            cells = []
            for op in OPS:
                t = statistics.median(times[(vname, op)])
                spread = (max(times[(vname, op)]) - min(times[(vname, op)])) / t
                frac = bench.bytes_moved(op, shape, axis, numpy.dtype(dtype).itemsize) / t / 1e9 / peak
                cells.append('{} {:7.3f} ms {:5.1%} (rounds +-{:.0%})'.format(op, t * 1e3, frac, spread / 2))
            line = '{:<18} {:<8} {:<18} {}'.format(case, numpy.dtype(dtype).name, vname, ' | '.join(cells))
            print(line, flush=True)
            lines.append(line)
        del x, label
        bench.free_device_memory()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'tune_gpu.txt'), 'w') as f:
        f.write('\n'.join(lines + mismatches) + '\n')
    for m in mismatches:
        print('# MISMATCH', m)
    return 1 if mismatches else 0


if __name__ == '__main__':
    sys.exit(main())
