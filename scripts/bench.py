#!/usr/bin/env python
"""Benchmark cupy_sce against its peers, measured in the same run.

    python scripts/bench.py [--quick] [--overhead] [--linear] [--device cpu|gpu|all] [--threads N] [--repeat N]
                            [--simd avx2] [--out DIR]

CPU peers (whichever are installed): a naive NumPy composition, PyTorch CPU
``F.cross_entropy(reduction='none')`` (+ ``.backward()``), and one
single-threaded ``np.exp(x, out=y)`` pass over the logits (the floor a
forward pass is measured against).  GPU peers: PyTorch CUDA and a naive CuPy composition.
cupy_sce runs on the CPU kernels it would pick by default (the compiled ones when numba is
installed); with numba, the pure-NumPy kernels are timed next to them as the peer ``cupy_sce numpy
kernels``.  Each timed call's result is dropped before the next call, as a training step drops
the last step's gradient, so cupy_sce's large outputs come from its output cache
(``set_output_cache_limit``); the peer ``cupy_sce fresh outputs`` is the same call with the cache
off (fresh pages for every gradient or softmax, as PyTorch CPU allocates them).

--simd avx2: the whole run as on a host without AVX-512 (this machine type comes with and without
it): NumPy's dispatch (NPY_DISABLE_CPU_FEATURES), numba's code generation (NUMBA_CPU_NAME=haswell)
and PyTorch's kernels (ATEN_CPU_CAPABILITY=avx2) limited to AVX2, set before they are imported.

bfloat16 (with ml_dtypes installed): on the CPU at 4096x32000 (512x32000 with --quick) against
PyTorch's bfloat16 F.cross_entropy and the naive composition on a float32 copy; on a GPU next to
float16 and float32 at the large-vocabulary shapes.

Per case it prints the median time over the repeats after a warm-up (CUDA
events on a GPU), the effective GB/s under the byte model below, the ratio
peer_time / cupy_sce_time for each peer (> 1: cupy_sce is faster), and on a
GPU the fraction of the peak memory bandwidth.  It writes bench.csv and, with
matplotlib installed, bench.png under --out.

--linear (a small shape in --quick): the fused linear + cross entropy (cupy_sce.linear) at
N=8192, H=2048, V=32000 float32 against the unfused composition and PyTorch CPU, time and extra
peak memory; on a GPU (--device gpu) at N=8192, H=4096, V=128256 in float16 and float32 against
the unfused composition and PyTorch CUDA, time and peak memory.

--scale-out: cupy_sce.dask at 4096x32000 float32 (chunks of a quarter of the rows, then also of the
classes) against the single-array call on the threaded scheduler, and the vocabulary-parallel
forward under ``mpiexec -n 2`` (one thread a rank) against one process.

--overhead (also run by --quick): per-call time of small problems, (8, 10), (64, 1000) and
(256, 32000), for forward, softmax_with_cross_entropy and forward_backward against the naive
NumPy composition and PyTorch CPU in the same process, and the CuPy backend's host time per call
with kernel launches that do nothing.

Byte model (what an ideal fused kernel must move; labels, loss and lse, a few
bytes per row, are counted too):
  forward           reads the logits once                      N*K*s
  forward+softmax   reads the logits, writes the softmax       2*N*K*s
  backward          reads the logits (+lse), writes the grad   2*N*K*s
  forward+backward  reads the logits once, writes the grad     2*N*K*s   (also in place)
where s is the logits' itemsize.
"""
import argparse
import csv
import os
import platform
import statistics
import sys
import time
import tracemalloc

import numpy

import cupy_sce

CPU_CASES = [  # (name, shape, axis)
    ('4096x32000', (4096, 32000), -1),
    ('65536x1000', (65536, 1000), -1),
    ('1048576x10', (1048576, 10), -1),
    ('64x1000x256 axis=1', (64, 1000, 256), 1),
]
CPU_QUICK = [
    ('512x32000', (512, 32000), -1),
    ('8192x1000', (8192, 1000), -1),
    ('131072x10', (131072, 10), -1),
    ('8x1000x256 axis=1', (8, 1000, 256), 1),
]
GPU_CASES = CPU_CASES + [('8192x128256', (8192, 128256), -1)]
GPU_QUICK = CPU_QUICK + [('1024x128256', (1024, 128256), -1)]
OPS = ('forward', 'forward+softmax', 'backward', 'forward+backward', 'forward+backward inplace')
# --simd avx2: what each library reads to stay within AVX2 (X86_V4 is NumPy's AVX-512 group)
AVX2_ONLY = dict(NPY_DISABLE_CPU_FEATURES='X86_V4 AVX512_ICL AVX512_SPR', NUMBA_CPU_NAME='haswell',
                 ATEN_CPU_CAPABILITY='avx2')


# ---------------------------------------------------------------- inputs and the byte model

def make_inputs(xp, shape, axis, dtype, seed=0):
    """Logits ~ N(0, 2**2) and uniform labels, drawn where they will be used (a GPU draws 1e9
    normals in milliseconds, the host in seconds)."""
    lshape = list(shape)
    lshape[axis] = 1
    if xp is numpy:
        rng = numpy.random.default_rng(seed)
        x = rng.standard_normal(shape, dtype=numpy.float32)
        label = rng.integers(0, shape[axis], size=lshape)
    else:
        rng = xp.random.RandomState(seed)
        x = rng.standard_normal(shape, dtype=numpy.float32)
        label = rng.randint(0, shape[axis], size=lshape, dtype=numpy.int64)
    x *= 2
    return x.astype(dtype, copy=False), label


def bytes_moved(op, shape, axis, itemsize):
    n_elem = int(numpy.prod(shape))
    rows = n_elem // shape[axis]
    per_row = 8 + 2 * itemsize  # label, loss, lse (or loss_grad)
    passes = 1 if op == 'forward' else 2
    return passes * n_elem * itemsize + rows * per_row


# ---------------------------------------------------------------- implementations

def ours(op, x, label, axis, lse=None):
    if op == 'forward':
        return lambda: cupy_sce.softmax_with_cross_entropy(x, label, axis=axis)
    if op == 'forward+softmax':
        return lambda: cupy_sce.softmax_with_cross_entropy(x, label, axis=axis, return_softmax=True)
    if op == 'backward':
        return lambda: cupy_sce.backward(None, x, lse, label, axis=axis)
    if op == 'forward+backward':
        return lambda: cupy_sce.forward_backward(x, label, axis=axis)
    if op == 'forward+backward inplace':
        work = x.copy()
        return lambda: cupy_sce.forward_backward(work, label, axis=axis, inplace=True)
    raise ValueError(op)


def moved_axis(xp, x, label, axis):
    """The strided path's alternative: move the class axis last, copy, call the contiguous path."""
    return lambda: cupy_sce.softmax_with_cross_entropy(
        xp.ascontiguousarray(xp.moveaxis(x, axis, -1)), xp.ascontiguousarray(xp.moveaxis(label, axis, -1)))


def naive(xp, op, x, label, axis):
    """What a user writes by hand: max, exp, sum, log, gather (and softmax - onehot).  16-bit logits
    on the CPU go through a float32 copy first (NumPy has no fast 16-bit arithmetic; bfloat16's
    ufuncs from ml_dtypes convert each element)."""
    def softmax_parts():
        x32 = x.astype(numpy.float32) if xp is numpy and x.dtype.itemsize == 2 else x
        shifted = x32 - x32.max(axis=axis, keepdims=True)
        e = xp.exp(shifted)
        s = e.sum(axis=axis, keepdims=True)
        return shifted, e, s

    def forward():
        shifted, _, s = softmax_parts()
        return xp.log(s) - xp.take_along_axis(shifted, label, axis=axis)

    def forward_softmax():
        shifted, e, s = softmax_parts()
        return xp.log(s) - xp.take_along_axis(shifted, label, axis=axis), e / s

    def backward():
        _, e, s = softmax_parts()
        grad = e / s
        xp.put_along_axis(grad, label, xp.take_along_axis(grad, label, axis=axis) - 1, axis=axis)
        return grad

    def forward_backward():
        shifted, e, s = softmax_parts()
        loss = xp.log(s) - xp.take_along_axis(shifted, label, axis=axis)
        grad = e / s
        xp.put_along_axis(grad, label, xp.take_along_axis(grad, label, axis=axis) - 1, axis=axis)
        return loss, grad
    return {'forward': forward, 'forward+softmax': forward_softmax, 'backward': backward,
            'forward+backward': forward_backward, 'forward+backward inplace': None}[op]


def torch_tensors(device, *arrays):
    """(torch, F, tensors) for the peer on ``device``, or None without PyTorch (or its CUDA)."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if device == 'cuda' and not torch.cuda.is_available():
        return None
    tensors = []
    for a in arrays:
        if device == 'cuda' and hasattr(a, '__dlpack__'):  # zero-copy view of the CuPy arrays
            tensors.append(torch.from_dlpack(a))
            continue
        host = numpy.asarray(a.get() if hasattr(a, 'get') else a)
        if host.dtype.name == 'bfloat16':  # ml_dtypes' bfloat16: torch takes its bits
            tensors.append(torch.from_numpy(host.view(numpy.int16)).view(torch.bfloat16).to(device))
        else:
            tensors.append(torch.as_tensor(host).to(device))
    return torch, F, tensors


def torch_peer(op, x, label, axis, device):
    found = torch_tensors(device, x, label)
    if found is None:
        return None
    torch, F, (xt, lt) = found
    lt = lt.squeeze(axis)
    class_axis = axis % xt.ndim
    if class_axis != 1:  # F.cross_entropy wants classes on dim 1
        xt = xt.movedim(class_axis, 1).contiguous()

    def forward():
        with torch.no_grad():
            return F.cross_entropy(xt, lt, reduction='none')

    def forward_softmax():
        with torch.no_grad():
            return F.cross_entropy(xt, lt, reduction='none'), torch.softmax(xt, 1)

    def forward_backward():
        xg = xt.detach().requires_grad_(True)
        loss = F.cross_entropy(xg, lt, reduction='none')
        loss.backward(torch.ones_like(loss))
        return loss, xg.grad
    return {'forward': forward, 'forward+softmax': forward_softmax, 'backward': None,
            'forward+backward': forward_backward, 'forward+backward inplace': None}[op]


# ---------------------------------------------------------------- timing

def time_cpu(fn, repeat):
    fn()  # warm-up (thread pool, scratch buffers, page faults)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def time_events(fn, repeat, event, synchronize):
    """Median and min seconds of ``fn`` between two recorded events (CUDA events of CuPy or torch)."""
    fn()
    synchronize()
    times = []
    for _ in range(repeat):
        start, stop = event(), event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3 if hasattr(start, 'elapsed_time')
                     else _cupy_elapsed(start, stop))
    return statistics.median(times), min(times)


def _cupy_elapsed(start, stop):
    import cupy
    return cupy.cuda.get_elapsed_time(start, stop) / 1e3


def time_gpu(fn, repeat):
    import cupy
    return time_events(fn, repeat, cupy.cuda.Event, cupy.cuda.runtime.deviceSynchronize)


def time_torch_cuda(fn, repeat):
    import torch
    return time_events(fn, repeat, lambda: torch.cuda.Event(enable_timing=True), torch.cuda.synchronize)


def extra_peak_bytes(fn):
    """(first call, later calls): peak bytes NumPy allocated during ``fn()`` beyond what it
    returned (tracemalloc).  The first call after ``release_scratch`` allocates the backend's
    per-thread scratch; later calls reuse it."""
    def measure():
        tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        outputs = result if isinstance(result, tuple) else (result,)
        return peak - base - sum(o.nbytes for o in outputs if o is not None), result
    cupy_sce.release_scratch()
    # the first call's outputs stay alive during the second, so that the second allocates its own
    # (a dropped output's memory would serve it from the output cache, untraced)
    first, kept = measure()
    later, _ = measure()
    del kept
    return first, later


def peak_bandwidth_gbs():
    """2 * memory clock * bus width, from the device attributes (CUDA 13 dropped the fields from
    cudaDeviceProp, the attributes remain), else from NVML."""
    import cupy
    rt = cupy.cuda.runtime
    try:
        clock_khz = rt.deviceGetAttribute(rt.cudaDevAttrMemoryClockRate, 0)
        bus_bits = rt.deviceGetAttribute(rt.cudaDevAttrGlobalMemoryBusWidth, 0)
    except Exception:
        clock_khz = bus_bits = None
    if not clock_khz or not bus_bits:
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            clock_khz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM) * 1000
            bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        except Exception:
            return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # DDR: two transfers per clock


# ---------------------------------------------------------------- runs

def cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def report_skipped_peers(device):
    """Say once, at the start of a run, which peers will be missing from the ratios and why."""
    try:
        import torch
    except ImportError as exc:
        why = 'not installed' if isinstance(exc, ModuleNotFoundError) else 'import failed'
        print('# peer skipped: PyTorch ({}: {})'.format(why, exc))
        return
    if device in ('gpu', 'all') and not torch.cuda.is_available():
        print('# peer skipped: PyTorch CUDA (torch {} sees no CUDA device)'.format(torch.__version__))


def peer_times(xp, op, x, label, axis, repeat, device):
    """{peer: median seconds} for the naive composition and PyTorch on the same inputs.

    A peer that fails (out of memory, a missing function in an older release) is reported and
    left out; it does not end the run."""
    timer = time_cpu if device == 'cpu' else time_gpu
    torch_timer = time_cpu if device == 'cpu' else time_torch_cuda
    peers = {}
    candidates = (('{} naive'.format(xp.__name__), lambda: naive(xp, op, x, label, axis), timer),
                  ('torch {}'.format(device), lambda: torch_peer(op, x, label, axis, device), torch_timer))
    for peer, make, peer_timer in candidates:
        try:
            fn = make()
            if fn is not None:
                peers[peer] = peer_timer(fn, repeat)[0]
        except Exception as exc:  # noqa: BLE001 -- a peer's failure is data, not the end of the run
            print('# peer {} failed on {}: {}: {}'.format(peer, op, type(exc).__name__, str(exc)[:200]))
    return peers


def check_against_float64(xp, x, label, axis, rows=256):
    """Relative errors (loss, grad) of cupy_sce on the first ``rows`` entries of axis 0, computed
    on the whole array, against a float64 composition written independently of the kernels:
    loss = log(sum(exp(x - max))) + max - x[label], grad = exp(x - lse) - onehot(label)."""
    loss, grad = cupy_sce.forward_backward(x, label, axis=axis)
    x64 = x[:rows].astype(numpy.float64)
    lab = label[:rows]
    row_max = x64.max(axis=axis, keepdims=True)
    lse = xp.log(xp.exp(x64 - row_max).sum(axis=axis, keepdims=True)) + row_max
    ref_loss = lse - xp.take_along_axis(x64, lab, axis=axis)
    ref_grad = xp.exp(x64 - lse)
    xp.put_along_axis(ref_grad, lab, xp.take_along_axis(ref_grad, lab, axis=axis) - 1, axis=axis)

    def rel(ours, ref):
        return float(xp.linalg.norm((ours.astype(numpy.float64) - ref).ravel()) / xp.linalg.norm(ref.ravel()))
    return rel(loss[:rows], ref_loss), rel(grad[:rows], ref_grad)


CHECK_TOLERANCE = {'float16': 2e-3, 'bfloat16': 1.6e-2, 'float32': 1e-5, 'float64': 1e-12}


def copy_bandwidth_gbs(repeat):
    """Device-to-device copy of 2 GiB, counting bytes read plus written: the practical ceiling."""
    import cupy
    src = cupy.ones(2 ** 29, numpy.float32)
    dst = cupy.empty_like(src)
    seconds = time_gpu(lambda: cupy.copyto(dst, src), repeat)[0]
    return 2 * 2 ** 31 / seconds / 1e9  # the buffers go back to the pool when this returns


def numpy_kernels_peer(fn):
    """``fn`` on the NumPy backend's pure-NumPy kernels, or None when the default kernels are those
    already (then there is nothing to compare)."""
    if cupy_sce.get_cpu_kernels() == 'numpy':
        return None

    def on_numpy_kernels():
        cupy_sce.set_cpu_kernels('numpy')
        try:
            return fn()
        finally:
            cupy_sce.set_cpu_kernels(None)
    return on_numpy_kernels


def fresh_outputs_peer(fn):
    """``fn`` with the NumPy backend's output cache off (``set_output_cache_limit(0)``): every
    gradient or softmax in fresh pages, as before the cache and as PyTorch CPU allocates."""
    def with_fresh_outputs():
        limit = cupy_sce.get_output_cache_limit()
        cupy_sce.set_output_cache_limit(0)
        try:
            return fn()
        finally:
            cupy_sce.set_output_cache_limit(limit)
    return with_fresh_outputs


def simd_found():
    """NumPy's SIMD dispatch targets found on this host (what --simd avx2 limits)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__, __cpu_dispatch__
        found = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
        return ' '.join(found) or 'baseline only'
    except ImportError:  # pragma: no cover - other NumPy layouts
        return 'unknown'


def run_cpu(args, rows):
    cases = CPU_QUICK if args.quick else CPU_CASES
    print('# CPU: {} ({} usable cores), cupy_sce threads: {}, CPU kernels: {}, numpy {} (SIMD: {}), '
          'dtype float32'.format(cpu_model(), len(os.sched_getaffinity(0)), cupy_sce.get_num_threads(),
                                 cupy_sce.get_cpu_kernels(), numpy.__version__, simd_found()))
    for name, shape, axis in cases:
        x, label = make_inputs(numpy, shape, axis, numpy.float32)
        _, lse = cupy_sce.forward(x, label, axis=axis)
        exp_floor = None
        if axis == -1:
            y = numpy.empty_like(x)
            exp_floor = time_cpu(lambda: numpy.exp(x, out=y), args.repeat)[0]
            del y
        for op in OPS:
            ours_fn = ours(op, x, label, axis, lse)
            t_ours, t_min = time_cpu(ours_fn, args.repeat)
            nbytes = bytes_moved(op, shape, axis, 4)
            row = dict(device='cpu', case=name, op=op, impl='cupy_sce', median_ms=t_ours * 1e3,
                       min_ms=t_min * 1e3, gbs=nbytes / t_ours / 1e9)
            peers = peer_times(numpy, op, x, label, axis, args.repeat, 'cpu')
            pure = numpy_kernels_peer(ours_fn)
            if pure is not None and (not args.quick or op in ('forward', 'forward+backward')):
                peers['cupy_sce numpy kernels'] = time_cpu(pure, args.repeat)[0]
            if op in ('forward+softmax', 'backward', 'forward+backward') and (not args.quick or op == 'forward+backward'):
                peers['cupy_sce fresh outputs'] = time_cpu(fresh_outputs_peer(ours_fn), args.repeat)[0]
            if op == 'forward' and exp_floor is not None:
                peers['np.exp pass'] = exp_floor
            if op == 'forward' and axis != -1:
                peers['moveaxis+contiguous'] = time_cpu(moved_axis(numpy, x, label, axis), args.repeat)[0]
            if op == 'forward':
                first, later = extra_peak_bytes(ours_fn)
                row['first_call_extra_mib'], row['extra_peak_mib'] = first / 2 ** 20, later / 2 ** 20
                row['logits_mib'] = x.nbytes / 2 ** 20
            emit(rows, row, peers)
    run_cpu_bfloat16(args, rows)
    run_feature_costs(numpy, time_cpu, args, rows, 'cpu')


# The loss family's cost (forward+backward, reduction='mean'), each against the featureless call
# measured in the same interleaved rounds.
FEATURE_SETS = [
    ('no features', {}),
    ('weight', dict(weight=True)),
    ('smoothing', dict(label_smoothing=0.1)),
    ('z-loss', dict(z_loss=1e-4)),
    ('softcap', dict(softcap=30.0)),
    ('weight+smoothing+z-loss', dict(weight=True, label_smoothing=0.1, z_loss=1e-4)),
    ('all four', dict(weight=True, label_smoothing=0.1, z_loss=1e-4, softcap=30.0)),
]


def torch_family_peer(x, label, weight, axis, device):
    """PyTorch's F.cross_entropy forward+backward with class weights and label smoothing (mean)."""
    found = torch_tensors(device, x, label, weight)
    if found is None:
        return None
    _, F, (xt, lt, wt) = found
    lt = lt.squeeze(axis)

    def forward_backward():
        xg = xt.detach().requires_grad_(True)
        loss = F.cross_entropy(xg, lt, weight=wt, label_smoothing=0.1)
        loss.backward()
        return loss, xg.grad
    return forward_backward


def run_feature_costs(xp, timer, args, rows, device):
    """forward+backward with each feature set, interleaved with the featureless call (rounds); on
    the CPU on each of the NumPy backend's kernels."""
    kinds = [None]
    if device == 'cpu' and cupy_sce.get_cpu_kernels() == 'numba':
        kinds = ['numba', 'numpy']
    for kind in kinds:
        try:
            cupy_sce.set_cpu_kernels(kind)
            _run_feature_costs(xp, timer, args, rows, device, '' if kind is None else ' ({} kernels)'.format(kind))
        finally:
            cupy_sce.set_cpu_kernels(None)


def _run_feature_costs(xp, timer, args, rows, device, label_suffix):
    name, shape, axis = (CPU_QUICK if args.quick else CPU_CASES)[0]
    x, label = make_inputs(xp, shape, axis, numpy.float32)
    weight = xp.asarray(numpy.random.default_rng(1).uniform(0.5, 2.0, shape[axis]).astype(numpy.float32))
    calls = {}
    for fname, options in FEATURE_SETS:
        kw = dict(options, reduction='mean')
        if kw.pop('weight', False):
            kw['weight'] = weight
        calls[fname] = (lambda kw=kw: cupy_sce.forward_backward(x, label, axis=axis, **kw))
    torch_fn = torch_family_peer(x, label, weight, axis, 'cuda' if device == 'gpu' else 'cpu')
    times = {}
    order = list(calls.items()) + ([('torch', torch_fn)] if torch_fn is not None else [])
    for round_ in range(args.repeat):
        # rounds: drift of the machine hits every variant alike; each round starts one further
        # along, so no variant is always the one that follows PyTorch (whose freed buffers leave
        # the next call fresh pages to fault in)
        start = round_ % len(order)
        for fname, fn in order[start:] + order[:start]:
            times.setdefault(fname, []).append(timer(fn, 1)[0])
    base = statistics.median(times['no features'])
    for fname, _ in FEATURE_SETS:
        t = statistics.median(times[fname])
        suffix = label_suffix
        if 'softcap' in fname and 'numba' in label_suffix:
            suffix = ' (numba kernels; softcap on the NumPy steps)'
        row = dict(device=device, case=name, op='fwd+bwd mean, ' + fname + suffix, impl='cupy_sce',
                   median_ms=t * 1e3,
                   min_ms=min(times[fname]) * 1e3, gbs=bytes_moved('forward+backward', shape, axis, 4) / t / 1e9,
                   feature_cost=t / base - 1)
        peers = {'no features': base}
        if 'torch' in times and fname == 'weight+smoothing+z-loss':
            peers['PyTorch weight+smoothing'] = statistics.median(times['torch'])
        emit(rows, row, peers)


def bfloat16_or_none():
    """ml_dtypes' bfloat16, or None (then the bfloat16 rows are skipped, and said so)."""
    from cupy_sce import _dtypes
    if _dtypes.bfloat16_available():
        return _dtypes.bfloat16()
    print('# bfloat16 rows skipped: ml_dtypes is not installed (pip install ml_dtypes)')
    return None


def large_k_gpu_dtypes():
    """The dtypes of the large-vocabulary GPU rows."""
    bf16 = bfloat16_or_none()
    return (numpy.float32, numpy.float16) + ((bf16,) if bf16 is not None else ())


# bfloat16 on the CPU (issue 12): against PyTorch's bfloat16 F.cross_entropy
BF16_OPS = ('forward', 'forward+backward', 'forward+backward inplace')


def run_cpu_bfloat16(args, rows):
    bf16 = bfloat16_or_none()
    if bf16 is None:
        return
    name, shape, axis = (CPU_QUICK if args.quick else CPU_CASES)[0]
    x, label = make_inputs(numpy, shape, axis, bf16)
    loss_err, grad_err = check_against_float64(numpy, x, label, axis)
    print('# check {} bfloat16: loss rel err {:.2e}, grad rel err {:.2e} vs float64 -> {}'.format(
        name, loss_err, grad_err, 'ok' if max(loss_err, grad_err) <= CHECK_TOLERANCE['bfloat16'] else 'FAILED'))
    for op in BF16_OPS:
        t_ours, t_min = time_cpu(ours(op, x, label, axis), args.repeat)
        row = dict(device='cpu', case=name + ' bfloat16', op=op, impl='cupy_sce', median_ms=t_ours * 1e3,
                   min_ms=t_min * 1e3, gbs=bytes_moved(op, shape, axis, 2) / t_ours / 1e9)
        emit(rows, row, peer_times(numpy, op, x, label, axis, args.repeat, 'cpu'))


def run_gpu(args, rows):
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    peak = peak_bandwidth_gbs()
    copy = copy_bandwidth_gbs(args.repeat)
    name = props['name'].decode() if isinstance(props['name'], bytes) else props['name']
    free_device_memory()
    print('# GPU: {}, peak memory bandwidth {} GB/s (device attributes), device-to-device copy {:.0f} GB/s '
          '(read + write), CuPy {}'.format(
              name, 'unknown' if peak is None else '{:.0f}'.format(peak), copy, cupy.__version__))
    print('# {} SMs, L2 {} MiB, shared memory per block {} KiB (opt-in {} KiB)'.format(
        props.get('multiProcessorCount'), props.get('l2CacheSize', 0) // 2 ** 20,
        props.get('sharedMemPerBlock', 0) // 1024, props.get('sharedMemPerBlockOptin', 0) // 1024))
    cases = GPU_QUICK if args.quick else GPU_CASES
    failures = []
    large_k_dtypes = large_k_gpu_dtypes()
    for case, shape, axis in cases:
        for dtype in (large_k_dtypes if shape[-1] > 100000 else (numpy.float32,)):
            case_name = '{} {}'.format(case, numpy.dtype(dtype).name)
            x, label = make_inputs(cupy, shape, axis, dtype)
            loss_err, grad_err = check_against_float64(cupy, x, label, axis)
            ok = max(loss_err, grad_err) <= CHECK_TOLERANCE[numpy.dtype(dtype).name]
            print('# check {}: loss rel err {:.2e}, grad rel err {:.2e} vs float64 -> {}'.format(
                case_name, loss_err, grad_err, 'ok' if ok else 'FAILED'))
            if not ok:
                failures.append(case_name)
            _, lse = cupy_sce.forward(x, label, axis=axis)
            for op in OPS:
                t_ours, t_min = time_gpu(ours(op, x, label, axis, lse), args.repeat)
                gbs = bytes_moved(op, shape, axis, x.dtype.itemsize) / t_ours / 1e9
                row = dict(device='gpu', case=case_name, op=op,
                           impl='cupy_sce', median_ms=t_ours * 1e3, min_ms=t_min * 1e3, gbs=gbs)
                if peak:
                    row['peak_fraction'] = gbs / peak
                row['copy_fraction'] = gbs / copy
                peers = peer_times(cupy, op, x, label, axis, args.repeat, 'cuda')
                if op == 'forward' and axis != -1:
                    peers['moveaxis+contiguous'] = time_gpu(moved_axis(cupy, x, label, axis), args.repeat)[0]
                emit(rows, row, peers)
            del x, label, lse
            free_device_memory()
    run_feature_costs(cupy, time_gpu, args, rows, 'gpu')
    return failures


def free_device_memory():
    import cupy
    cupy.get_default_memory_pool().free_all_blocks()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def emit(rows, row, peers):
    row['ratios'] = {peer: t / (row['median_ms'] / 1e3) for peer, t in peers.items()}
    row['peer_ms'] = {peer: t * 1e3 for peer, t in peers.items()}
    rows.append(row)
    extra = ''
    if 'peak_fraction' in row:
        extra += ' {:5.1%} of peak'.format(row['peak_fraction'])
    if 'copy_fraction' in row:
        extra += ' {:5.1%} of copy'.format(row['copy_fraction'])
    if 'feature_cost' in row:
        extra += ' cost {:+.1%}'.format(row['feature_cost'])
    if 'extra_peak_mib' in row:
        extra += ' extra peak {:.2f} MiB, first call {:.1f} MiB (logits {:.0f} MiB)'.format(
            row['extra_peak_mib'], row['first_call_extra_mib'], row['logits_mib'])
    ratio_text = ', '.join('{} {:.1f} ms -> x{:.2f}'.format(p, row['peer_ms'][p], r)
                           for p, r in row['ratios'].items())
    print('{:<24} {:<25} {:9.2f} ms {:7.1f} GB/s{} | {}'.format(
        row['case'], row['op'], row['median_ms'], row['gbs'], extra, ratio_text), flush=True)


def write_outputs(rows, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'bench.csv')
    peers = sorted({p for r in rows for p in r['ratios']})
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['device', 'case', 'op', 'median_ms', 'min_ms', 'gbs', 'peak_fraction', 'copy_fraction',
                    'extra_peak_mib', 'first_call_extra_mib', 'cupy_host_us']
                   + ['{} ms'.format(p) for p in peers] + ['x vs {}'.format(p) for p in peers])
        for r in rows:
            w.writerow([r['device'], r['case'], r['op'], '{:.4f}'.format(r['median_ms']),
                        '{:.4f}'.format(r['min_ms']), '{:.2f}'.format(r['gbs']),
                        '{:.4f}'.format(r['peak_fraction']) if 'peak_fraction' in r else '',
                        '{:.4f}'.format(r['copy_fraction']) if 'copy_fraction' in r else '',
                        '{:.3f}'.format(r['extra_peak_mib']) if 'extra_peak_mib' in r else '',
                        '{:.3f}'.format(r['first_call_extra_mib']) if 'first_call_extra_mib' in r else '',
                        '{:.2f}'.format(r['host_us']) if 'host_us' in r else '']
                       + ['{:.4f}'.format(r['peer_ms'][p]) if p in r['peer_ms'] else '' for p in peers]
                       + ['{:.3f}'.format(r['ratios'][p]) if p in r['ratios'] else '' for p in peers])
    print('wrote', path)
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib not installed: no chart (pip install -e ".[bench]")')
        return
    rows = [r for r in rows if 'host_us' not in r]  # the per-call rows have no throughput
    if not rows:
        return
    labels = ['{}\n{}'.format(r['case'], r['op']) for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(rows)), 5))
    ax.bar(range(len(rows)), [r['gbs'] for r in rows])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel('effective GB/s (byte model in bench.py)')
    ax.set_title('cupy_sce throughput')
    fig.tight_layout()
    png = os.path.join(out_dir, 'bench.png')
    fig.savefig(png, dpi=120)
    print('wrote', png)


# ---------------------------------------------------------------- per-call overhead

OVERHEAD_SHAPES = ((8, 10), (64, 1000), (256, 32000))


def no_launch_runtime():
    """A CuPy backend runtime whose kernel launches do nothing, on NumPy arrays (the harness's
    runtime without its kernels): what remains of a call is the host's work in front of every
    GPU launch (checks, views, launch plan, arguments)."""
    from cupy_sce.testing.harness import HarnessRuntime

    class Kernel:
        max_dynamic_shared_size_bytes = 1 << 30

        def __call__(self, grid, block, args, shared_mem=0):
            pass

    class NoLaunchRuntime(HarnessRuntime):
        def kernel(self, dtype, name):
            return Kernel()

        @staticmethod
        def limits():
            return (False, 0)
    return NoLaunchRuntime()


def per_call_us(fn, calls, rounds=5):
    """Best of ``rounds`` of the mean time of ``calls`` back-to-back calls, in microseconds."""
    fn()
    best = float('inf')
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def overhead_calls(x, label):
    """{name: (cupy_sce call, naive NumPy call, PyTorch CPU call or None)} for one shape."""
    naive_forward = naive(numpy, 'forward', x, label, -1)
    naive_fb = naive(numpy, 'forward+backward', x, label, -1)
    naive_sm = naive(numpy, 'forward+softmax', x, label, -1)
    torch_forward = torch_peer('forward', x, label, -1, 'cpu')
    torch_sm = torch_peer('forward+softmax', x, label, -1, 'cpu')
    torch_fb = torch_peer('forward+backward', x, label, -1, 'cpu')
    return {
        'forward': (lambda: cupy_sce.forward(x, label), naive_forward, torch_forward),
        'softmax_with_cross_entropy': (lambda: cupy_sce.softmax_with_cross_entropy(x, label), naive_forward,
                                       torch_forward),
        'swce return_softmax': (lambda: cupy_sce.softmax_with_cross_entropy(x, label, return_softmax=True),
                                naive_sm, torch_sm),
        'forward_backward': (lambda: cupy_sce.forward_backward(x, label), naive_fb, torch_fb),
    }


def run_overhead(args, rows):
    """Per-call time of small problems (NumPy backend) against the naive NumPy composition and
    PyTorch CPU, interleaved in the same process; and the CuPy backend's host time per call
    with launches that do nothing (no_launch_runtime)."""
    from cupy_sce import _cupy_backend, testing
    calls = 30 if args.quick else 2000
    print('# per-call overhead: best of 5 rounds of {} calls, microseconds'.format(calls))
    host_backend = _cupy_backend.CupyBackend(no_launch_runtime())
    for shape in OVERHEAD_SHAPES:
        x, label = make_inputs(numpy, shape, -1, numpy.float32)
        n_calls = max(5, calls * 640 // (x.size + 640)) if x.size > 64000 else calls
        name = 'x'.join(map(str, shape))
        for op, (ours, naive_fn, torch_fn) in overhead_calls(x, label).items():
            peers = {'numpy naive': per_call_us(naive_fn, n_calls)}
            if torch_fn is not None:
                peers['torch cpu'] = per_call_us(torch_fn, n_calls)
            pure = numpy_kernels_peer(ours)
            if pure is not None:
                peers['cupy_sce numpy kernels'] = per_call_us(pure, n_calls)
            us = per_call_us(ours, n_calls)
            with testing.use_backend(host_backend):
                host_us = per_call_us(ours, n_calls)
            row = dict(device='cpu', case=name, op='call ' + op, impl='cupy_sce', median_ms=us / 1e3,
                       min_ms=us / 1e3, gbs=0.0, host_us=host_us)
            row['peer_ms'] = {p: t / 1e3 for p, t in peers.items()}
            row['ratios'] = {p: t / us for p, t in peers.items()}
            rows.append(row)
            print('{:<12} {:<28} {:8.1f} us  cupy host path {:6.1f} us | {}'.format(
                name, op, us, host_us, ', '.join('{} {:.1f} us -> x{:.2f}'.format(p, peers[p], peers[p] / us)
                                                  for p in peers)), flush=True)
        bridge_rows(rows, name, x, label, n_calls)


def torch_bridge_calls(x, label):
    """(bridge call, PyTorch's own call) of a forward+backward with mean reduction, or None
    without PyTorch."""
    try:
        import torch
        from cupy_sce import torch as sce_torch
    except ImportError:
        return None
    xt, lt = torch.from_numpy(x), torch.from_numpy(label[:, 0])

    def call(loss_fn):
        def step():
            loss_fn(xt.detach().requires_grad_(True), lt).backward()
        return step
    return call(sce_torch.cross_entropy), call(torch.nn.functional.cross_entropy)


def paddle_bridge_calls(x, label):
    """(bridge call, Paddle's own call) of a forward+backward with mean reduction, or None
    without Paddle."""
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            import paddle
            from cupy_sce import paddle as sce_paddle
    except ImportError:
        return None
    xt, lt = paddle.to_tensor(x), paddle.to_tensor(label)

    def call(loss_fn):
        def step():
            logits = xt.detach()
            logits.stop_gradient = False
            loss_fn(logits, lt).backward()
        return step
    return call(sce_paddle.cross_entropy), call(paddle.nn.functional.cross_entropy)


def bridge_rows(rows, name, x, label, n_calls):
    """Each framework bridge's forward+backward per call against the plain array call
    (forward_backward, mean) and the framework's own loss, same process."""
    plain_us = None
    for framework, make_calls in (('torch', torch_bridge_calls), ('paddle', paddle_bridge_calls)):
        calls = make_calls(x, label)
        if calls is None:
            continue
        if plain_us is None:
            plain_us = per_call_us(lambda: cupy_sce.forward_backward(x, label, reduction='mean'), n_calls)
        peer = '{} cpu'.format(framework)
        theirs_us = per_call_us(calls[1], n_calls)
        us = per_call_us(calls[0], n_calls)
        rows.append(dict(device='cpu', case=name, op='call {} bridge fwd+bwd'.format(framework), impl='cupy_sce',
                         median_ms=us / 1e3, min_ms=us / 1e3, gbs=0.0, host_us=float('nan'),
                         peer_ms={'array call': plain_us / 1e3, peer: theirs_us / 1e3},
                         ratios={'array call': plain_us / us, peer: theirs_us / us}))
        print('{:<12} {:<28} {:8.1f} us  bridge overhead {:+6.1f} us | {} {:.1f} us -> x{:.2f}'.format(
            name, '{} bridge fwd+bwd'.format(framework), us, us - plain_us, peer, theirs_us, theirs_us / us),
            flush=True)


# ---------------------------------------------------------------- fused linear + cross entropy

LINEAR_CASE = (8192, 2048, 32000)
LINEAR_QUICK = (512, 256, 4000)


LINEAR_GPU_CASE = (8192, 4096, 128256)
LINEAR_GPU_QUICK = (1024, 1024, 32000)


def linear_steps(hidden, weight, label, torch_device):
    """(fused, unfused, PyTorch or None) forward+backward steps of the linear cross entropy with mean
    reduction, each returning what it keeps: the fused call; the unfused composition
    (``hidden @ weight.T``, in-place forward_backward, the two gradient matmuls); and
    ``F.linear`` + ``F.cross_entropy`` + backward on ``torch_device`` (None without PyTorch)."""
    from cupy_sce import linear

    def fused():
        return linear.linear_cross_entropy_forward_backward(hidden, weight, label)

    def unfused():
        logits = hidden @ weight.T
        loss, dlogits = cupy_sce.forward_backward(logits, label, reduction='mean', inplace=True)
        return loss, dlogits @ weight, dlogits.T @ hidden
    found = torch_tensors(torch_device, hidden, weight, label)
    if found is None:
        return fused, unfused, None
    _, F, (ht, wt, lt) = found

    def torch_step():
        w = wt.detach().requires_grad_(True)
        h = ht.detach().requires_grad_(True)
        F.cross_entropy(F.linear(h, w), lt).backward()
        return w.grad, h.grad
    return fused, unfused, torch_step


def pool_peak_bytes(fn):
    """Peak bytes of device memory ``fn()`` held at once through CuPy's allocator beyond what it
    returned (its temporaries), from a memory hook that follows every allocation and free."""
    from cupy.cuda import memory_hook

    class Peak(memory_hook.MemoryHook):
        name = 'cupy_sce_peak'

        def __init__(self):
            self.held = self.peak = 0

        def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
            self.held += mem_size
            self.peak = max(self.peak, self.held)

        def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
            self.held -= mem_size

    hook = Peak()
    with hook:
        result = fn()
    outputs = result if isinstance(result, tuple) else (result,)
    return hook.peak - sum(o.nbytes for o in outputs if o is not None)


def run_linear_gpu(args, rows):
    """Fused linear + cross entropy on a GPU, float16 and float32 (issue 14's GPU rows): time (CUDA
    events) and peak memory (CuPy's pool; PyTorch's max_memory_allocated) against the unfused
    composition and PyTorch CUDA (F.linear + F.cross_entropy + backward)."""
    import cupy
    N, H, V = LINEAR_GPU_QUICK if args.quick else LINEAR_GPU_CASE
    repeat = max(1, min(args.repeat, 5))
    for dtype in (numpy.float16, numpy.float32):
        rng = cupy.random.RandomState(0)
        hidden = (rng.standard_normal((N, H), dtype=numpy.float32) * 0.5).astype(dtype)
        weight = (rng.standard_normal((V, H), dtype=numpy.float32) / float(numpy.sqrt(H))).astype(dtype)
        label = rng.randint(0, V, size=(N,), dtype=numpy.int64)

        fused, unfused_step, torch_step = linear_steps(hidden, weight, label, 'cuda')
        name = '{}x{}x{} {}'.format(N, H, V, numpy.dtype(dtype).name)
        t_fused = time_gpu(fused, repeat)[0]
        peers = {'unfused': time_gpu(unfused_step, repeat)[0]}
        mem = {'cupy_sce': pool_peak_bytes(fused) / 2 ** 20, 'unfused': pool_peak_bytes(unfused_step) / 2 ** 20}
        free_device_memory()
        if torch_step is not None:
            import torch
            peers['torch cuda'] = time_torch_cuda(torch_step, repeat)[0]
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            grads = torch_step()
            mem['torch cuda'] = (torch.cuda.max_memory_allocated() - base
                                 - sum(g.numel() * g.element_size() for g in grads)) / 2 ** 20
            del grads
        row = dict(device='gpu', case=name, op='linear+cross entropy fwd+bwd', impl='cupy_sce',
                   median_ms=t_fused * 1e3, min_ms=t_fused * 1e3, gbs=0.0, extra_peak_mib=mem['cupy_sce'])
        row['peer_ms'] = {p: t * 1e3 for p, t in peers.items()}
        row['ratios'] = {p: t / t_fused for p, t in peers.items()}
        rows.append(row)
        print('{:<28} {:<20} {:9.2f} ms  peak memory MiB: {} (logits {:.0f}) | {}'.format(
            name, 'linear+CE fwd+bwd', t_fused * 1e3, ', '.join('{} {:.0f}'.format(k, v) for k, v in mem.items()),
            N * V * numpy.dtype(dtype).itemsize / 2 ** 20,
            ', '.join('{} {:.2f} ms -> x{:.2f}'.format(p, t * 1e3, t / t_fused) for p, t in peers.items())),
            flush=True)
        free_device_memory()


def run_linear(args, rows):
    """Fused linear + cross entropy (forward+backward, mean) against the unfused composition
    (``hidden @ weight.T``, forward_backward, the two gradient matmuls) and PyTorch CPU
    (``F.linear`` + ``F.cross_entropy`` + backward): time and extra peak memory (tracemalloc, NumPy
    allocations; PyTorch's own allocator is not traced, so its memory is the logits' size by
    construction and left out)."""
    N, H, V = LINEAR_QUICK if args.quick else LINEAR_CASE
    rng = numpy.random.default_rng(0)
    hidden = rng.standard_normal((N, H), dtype=numpy.float32) * 0.5
    weight = rng.standard_normal((V, H), dtype=numpy.float32) / float(numpy.sqrt(H))
    label = rng.integers(0, V, N)
    repeat = max(1, min(args.repeat, 3))

    fused, unfused_step, torch_step = linear_steps(hidden, weight, label, 'cpu')
    name = '{}x{}x{}'.format(N, H, V)
    logits_mib = N * V * 4 / 2 ** 20
    t_fused = time_cpu(fused, repeat)[0]
    t_unfused = time_cpu(unfused_step, repeat)[0]
    first_fused, peak_fused = (b / 2 ** 20 for b in extra_peak_bytes(fused))
    peak_unfused = extra_peak_bytes(unfused_step)[1] / 2 ** 20
    peers = {'unfused': t_unfused}
    if torch_step is not None:
        peers['torch cpu'] = time_cpu(torch_step, repeat)[0]
    row = dict(device='cpu', case=name, op='linear+cross entropy fwd+bwd', impl='cupy_sce', median_ms=t_fused * 1e3,
               min_ms=t_fused * 1e3, gbs=0.0, extra_peak_mib=peak_fused, first_call_extra_mib=first_fused,
               logits_mib=logits_mib)
    row['peer_ms'] = {p: t * 1e3 for p, t in peers.items()}
    row['ratios'] = {p: t / t_fused for p, t in peers.items()}
    rows.append(row)
    print('{:<24} {:<29} {:9.1f} ms  extra peak {:.1f} MiB (unfused {:.1f} MiB; logits {:.0f} MiB) | {}'.format(
        name, 'linear+CE fwd+bwd', t_fused * 1e3, peak_fused, peak_unfused, logits_mib,
        ', '.join('{} {:.1f} ms -> x{:.2f}'.format(p, t * 1e3, t / t_fused) for p, t in peers.items())), flush=True)


# ---------------------------------------------------------------- scaling out (issue 15)

SCALE_OUT_CASE = (4096, 32000)
SCALE_OUT_QUICK = (512, 32000)


def run_scale_out(args, rows):
    """cupy_sce.dask against the single-array call (the graph's overhead, threaded scheduler on
    this machine's cores), and the vocabulary-parallel forward under ``mpiexec -n 2`` against one
    process (``--mpi-worker`` runs on each rank)."""
    import subprocess
    import dask
    import dask.array as da
    from cupy_sce import dask as sce_dask
    N, V = SCALE_OUT_QUICK if args.quick else SCALE_OUT_CASE
    name = '{}x{}'.format(N, V)
    x, label = make_inputs(numpy, (N, V), -1, numpy.float32)
    label = label[:, 0]
    for chunks in ((N // 4, V), (N // 4, V // 4)):
        dx = da.from_array(x, chunks=chunks)
        for op, single, lazy in (
                ('forward', lambda: cupy_sce.forward(x, label),
                 lambda: dask.compute(*sce_dask.forward(dx, label), scheduler='threads')),
                ('forward+backward', lambda: cupy_sce.forward_backward(x, label),
                 lambda: dask.compute(*sce_dask.forward_backward(dx, label), scheduler='threads'))):
            t_dask, t_min = time_cpu(lazy, args.repeat)
            row = dict(device='cpu', case='{} dask chunks {}x{}'.format(name, *chunks), op=op, impl='cupy_sce.dask',
                       median_ms=t_dask * 1e3, min_ms=t_min * 1e3, gbs=bytes_moved(op, (N, V), -1, 4) / t_dask / 1e9)
            emit(rows, row, {'single array': time_cpu(single, args.repeat)[0]})
    mpiexec = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
    if not os.path.exists(mpiexec):
        print('# vocab-parallel rows skipped: no mpiexec next to this Python (pip install mpich mpi4py)')
        return
    result = subprocess.run([mpiexec, '-n', '2', sys.executable, os.path.abspath(__file__), '--mpi-worker',
                             '--repeat', str(args.repeat)] + (['--quick'] if args.quick else []),
                            capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, CUPY_SCE_NUM_THREADS='1'))
    if result.returncode != 0:
        print('# vocab-parallel run failed:\n' + (result.stdout + result.stderr)[-2000:])
        return
    times = dict(line.split()[1:3] for line in result.stdout.splitlines() if line.startswith('time '))
    row = dict(device='cpu', case=name + ' vocab-parallel 2 ranks', op='forward', impl='cupy_sce.distributed',
               median_ms=float(times['two_ranks']) * 1e3, min_ms=float(times['two_ranks']) * 1e3,
               gbs=bytes_moved('forward', (N, V), -1, 4) / float(times['two_ranks']) / 1e9)
    emit(rows, row, {'1 process, vocab_parallel': float(times['one_rank']),
                     '1 process, cupy_sce.forward': float(times['single_array'])})


def mpi_worker(args):
    """Under mpiexec: each rank times its half of the vocabulary; rank 0 also times one process."""
    from mpi4py import MPI
    from cupy_sce import distributed
    comm = MPI.COMM_WORLD
    N, V = SCALE_OUT_QUICK if args.quick else SCALE_OUT_CASE
    x, label = make_inputs(numpy, (N, V), -1, numpy.float32)
    label = label[:, 0]
    bounds = [V * r // comm.size for r in range(comm.size + 1)]
    local = numpy.ascontiguousarray(x[:, bounds[comm.rank]:bounds[comm.rank + 1]])

    def two_ranks():
        comm.Barrier()
        return distributed.vocab_parallel_forward(local, label, bounds[comm.rank], comm)
    t_two = time_cpu(two_ranks, args.repeat)[0]
    if comm.rank == 0:
        t_one = time_cpu(lambda: distributed.vocab_parallel_forward(x, label, 0, MPI.COMM_SELF), args.repeat)[0]
        t_single = time_cpu(lambda: cupy_sce.forward(x, label), args.repeat)[0]
        print('time two_ranks {}\ntime one_rank {}\ntime single_array {}'.format(t_two, t_one, t_single), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='small shapes, few repeats (< 1 minute)')
    parser.add_argument('--device', choices=('cpu', 'gpu', 'all'), default='cpu')
    parser.add_argument('--threads', type=int, default=None, help='NumPy backend threads')
    parser.add_argument('--repeat', type=int, default=None)
    parser.add_argument('--out', default='bench_out')
    parser.add_argument('--overhead', action='store_true',
                        help='only the per-call overhead of small problems (also part of --quick)')
    parser.add_argument('--linear', action='store_true',
                        help='only the fused linear + cross entropy at N=8192, H=2048, V=32000 (a small shape '
                             'in --quick)')
    parser.add_argument('--scale-out', action='store_true',
                        help='only cupy_sce.dask and the vocabulary-parallel forward under mpiexec -n 2')
    parser.add_argument('--simd', choices=('avx2',), default=None,
                        help='run as on a host without AVX-512 (NumPy, numba and PyTorch limited to AVX2)')
    parser.add_argument('--mpi-worker', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.simd and os.environ.get('CUPY_SCE_BENCH_SIMD') != args.simd:
        # NumPy reads its dispatch limits at import, and it is imported already: start again
        env = dict(os.environ, CUPY_SCE_BENCH_SIMD=args.simd, **AVX2_ONLY)
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(argv or sys.argv[1:]), env)
    if args.mpi_worker:
        args.repeat = args.repeat or 7
        mpi_worker(args)
        return 0
    if args.repeat is None:
        args.repeat = 3 if args.quick else 7
    if args.threads:
        cupy_sce.set_num_threads(args.threads)
    rows, failures = [], []
    report_skipped_peers(args.device)
    only = args.overhead or args.linear or args.scale_out
    if args.scale_out:
        run_scale_out(args, rows)
    if args.overhead or (args.quick and not only and args.device in ('cpu', 'all')):
        run_overhead(args, rows)
    if args.device in ('cpu', 'all') and (args.linear or (args.quick and not only)):
        run_linear(args, rows)
    if args.device in ('cpu', 'all') and not only:
        run_cpu(args, rows)
    if args.device in ('gpu', 'all'):
        try:
            import cupy
            has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
        except Exception:
            has_gpu = False
        if has_gpu:
            if not args.linear:
                failures = run_gpu(args, rows)
            if args.linear or not only:
                run_linear_gpu(args, rows)
        else:
            print('# GPU: none available, GPU cases skipped')
    write_outputs(rows, args.out)
    if failures:
        print('# results differ from the float64 reference: ' + ', '.join(failures))
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
