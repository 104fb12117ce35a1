"""Helpers shared by several test files: the backends the tests run on, problem generators,
tolerances and the checks that compare a backend with the float64 reference (``reference.py``).

Test files import from here (``from helpers import ...``); no test file imports another.

Backends (``Backend(name)``; the ``backend`` fixture of conftest.py runs a test on each):

* ``numpy``   -- the NumPy backend.
* ``harness`` -- the CuPy backend's host logic and the very CUDA kernels of
  ``cupy_sce/kernels``, compiled with g++ and executed on the CPU
  (``cupy_sce.testing.harness``).  Skips only when g++ or the CUDA headers
  are missing.
* ``cupy``    -- the CuPy backend on a real GPU.  Skips without one.
"""
import contextlib
import os

import ml_dtypes
import numpy
import pytest

import cupy_sce
from cupy_sce import testing
from cupy_sce.testing import harness as _harness
from reference import reference, reference_family

BFLOAT16 = ml_dtypes.bfloat16
DTYPES = (numpy.float16, BFLOAT16, numpy.float32, numpy.float64)
HALF_DTYPES = (numpy.float16, BFLOAT16)  # 16-bit logits, computed in float32
if os.environ.get(_harness.DTYPES_ENV):  # a probe whose harness holds fewer dtypes (test_mutations)
    _held = {numpy.dtype(d).name for d in _harness.DTYPES}
    DTYPES, HALF_DTYPES = ([d for d in group if numpy.dtype(d).name in _held] for group in (DTYPES, HALF_DTYPES))
finfo = ml_dtypes.finfo  # numpy.finfo does not know bfloat16


def soft_label_dtype(dtype):
    """The soft labels' dtype in tests: float32 for 16-bit logits (the compute dtype), else theirs."""
    return numpy.float32 if dtype in HALF_DTYPES else dtype


def compatible_dtypes(dtype):
    """The dtypes another floating argument may have beside logits of ``dtype`` (bfloat16 takes
    bfloat16 or float32 only)."""
    return (BFLOAT16, numpy.float32) if dtype == BFLOAT16 else tuple(d for d in DTYPES if d != BFLOAT16)


# ----------------------------------------------------------------------------- backends

def gpu_available():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


# The NumPy backend's two implementations (cupy_sce.set_cpu_kernels).
CPU_KERNELS = ('numpy', 'numba')


def skip_without_numba():
    try:
        import numba  # NOQA
    except ImportError:
        pytest.skip('numba is not installed: the compiled CPU kernels are unavailable')


@contextlib.contextmanager
def cpu_kernels(kind):
    """Run the NumPy backend on ``kind`` ('numpy' or 'numba') inside the block."""
    if kind == 'numba':
        skip_without_numba()
    previous = cupy_sce._numpy_backend._cpu_kernels_choice
    cupy_sce.set_cpu_kernels(kind)
    try:
        yield
    finally:
        cupy_sce.set_cpu_kernels(previous)


_harness_prebuilt = False


def _prebuild_harness_once():
    """Build every harness library (one per feature set) on every core at once, the first time a
    test asks for the harness backend: the suite launches nearly all of them, and one at a time,
    as the tests first need them, they took twice the wall time.  Not in the mutation tests'
    probes (they build only the libraries their probe launches, some from their own sources)."""
    global _harness_prebuilt
    if _harness_prebuilt:
        return
    _harness_prebuilt = True
    if (os.environ.get('CUPY_SCE_HARNESS_KERNEL_DIR') or os.environ.get('CUPY_SCE_HARNESS_ASAN') == '1'
            or _harness.OPT_ENV in os.environ):  # a probe (mutation tests): its own few libraries
        return
    from cupy_sce import _kernels
    _harness.prebuild(range(_kernels.ALL_FEATURES + 1))


class Backend:
    """One backend: ``backend(fn, *args, **kwargs)`` calls ``fn`` on it with NumPy arguments and
    returns NumPy results; ``with backend.active():`` routes direct calls to it."""

    def __init__(self, name):
        self.name = name
        # 'numpy' for the NumPy backend, whichever CPU kernels ('numpy': pure NumPy, 'numba':
        # compiled) it runs; else the name
        self.kind = 'numpy' if name in CPU_KERNELS else name
        self.xp = numpy
        self.routed = None  # the backend object ``active()`` routes calls to (harness only)
        if name == 'numba':
            skip_without_numba()
        if name == 'cupy':
            if not gpu_available():
                pytest.skip('no CUDA GPU present: the cupy backend runs on the host harness instead')
            import cupy
            self.xp = cupy
        elif name == 'harness':
            from cupy_sce.testing import harness
            reason = harness.unavailable_reason()
            if reason:
                pytest.skip('host harness unavailable: ' + reason)
            _prebuild_harness_once()
            self.routed = harness.backend()

    @property
    def impl(self):
        """The cupy_sce backend object calls on this backend use."""
        return self.routed if self.routed is not None else testing.default_backend(self.xp)

    @property
    def runtime(self):
        """The runtime of the harness or cupy backend (``launched``, ``kernel``, ``read_scalar``...)."""
        return self.impl.runtime

    def asarray(self, a):
        return self.xp.asarray(a) if isinstance(a, numpy.ndarray) else a

    @staticmethod
    def to_numpy(a):
        if isinstance(a, tuple):
            return tuple(Backend.to_numpy(v) for v in a)
        return a.get() if hasattr(a, 'get') else a

    @contextlib.contextmanager
    def active(self):
        if self.kind == 'numpy':
            with cpu_kernels(self.name):
                yield
        elif self.routed is None:
            yield
        else:
            with testing.use_backend(self.routed):
                yield

    def __call__(self, fn, *args, **kwargs):
        """Call ``fn`` with numpy arguments moved to this backend; results come back as numpy."""
        args = [self.asarray(a) for a in args]
        kwargs = {k: self.asarray(v) for k, v in kwargs.items()}
        with self.active():
            return self.to_numpy(fn(*args, **kwargs))


# ----------------------------------------------------------------------------- problems

def rows_shape(shape, axis):
    s = list(shape)
    s[axis] = 1
    return tuple(s)


def make_weight(rng, K, dtype=numpy.float32, zero_some=False):
    """Class weights that every float dtype holds exactly (multiples of 1/8 in [1/8, 3])."""
    w = rng.integers(1, 25, K) / 8.0
    if zero_some and K > 1:
        w[rng.integers(0, K)] = 0.0
    return w.astype(dtype)


def make_case(rng, shape, axis, *, dtype=numpy.float32, soft=False, ignore_index=-100, ignore_fraction=0.2,
              squeeze_label=False, label_dtype=numpy.int64, probabilities=False, scale=3.0,
              unnormalized=False):
    """Logits (or probabilities) of ``dtype`` and a label for a (shape, axis) problem.

    Hard labels (``label_dtype``) have a class axis of size 1 (squeezed with ``squeeze_label``)
    and ``ignore_fraction`` of rows at ``ignore_index``; soft labels are strictly positive rows
    summing to 1 (times a random row factor with ``unnormalized``), float32 for float16 logits.
    """
    K = shape[axis]
    z = rng.standard_normal(shape) * (1.0 if probabilities else scale)
    if probabilities:
        e = numpy.exp(z - z.max(axis=axis, keepdims=True))
        z = e / e.sum(axis=axis, keepdims=True)
    x = z.astype(dtype)
    if soft:
        label = rng.random(shape) + 0.01
        label /= label.sum(axis=axis, keepdims=True)
        if unnormalized:
            label *= rng.uniform(0.5, 2.0, rows_shape(shape, axis))
        return x, label.astype(soft_label_dtype(dtype))
    lshape = rows_shape(shape, axis)
    label = rng.integers(0, K, size=lshape)
    label[rng.random(lshape) < ignore_fraction] = ignore_index
    if squeeze_label:
        label = numpy.squeeze(label, axis)
    return x, label.astype(label_dtype)


# ----------------------------------------------------------------------------- the public paths

TOL = {numpy.float16: dict(rtol=2e-3, atol=2e-3), BFLOAT16: dict(rtol=1.6e-2, atol=1.6e-2),
       numpy.float32: dict(rtol=2e-5, atol=2e-6), numpy.float64: dict(rtol=1e-12, atol=1e-12)}


def grad_tol(path, dtype):
    """The tolerance of gradient ``path`` ('softmax', 'lse' or 'fused') for ``dtype``."""
    if path == 'softmax' and dtype == numpy.float16:  # the stored float16 softmax is the input
        return dict(rtol=5e-3, atol=5e-3)
    return TOL[dtype]


def assert_all_outputs(backend, x, label, soft=False, ignore_index=-100, axis=-1, loss_grad=None):
    """Every public path (4 gradient paths, lse, softmax) against the float64 reference."""
    ref_loss, ref_sm, ref_grad, ref_lse = reference(x, label, soft, ignore_index, axis, loss_grad)
    tol = TOL[x.dtype.type]
    kw = dict(soft_label=soft, ignore_index=ignore_index, axis=axis)
    x_before, label_before = x.copy(), label.copy()
    loss, sm = backend(cupy_sce.softmax_with_cross_entropy, x, label, return_softmax=True, **kw)
    assert loss.dtype == x.dtype and sm.dtype == x.dtype
    assert loss.shape == ref_loss.shape and sm.shape == x.shape
    numpy.testing.assert_allclose(loss, ref_loss, **tol)
    numpy.testing.assert_allclose(sm, ref_sm, **tol)
    loss2, lse = backend(cupy_sce.forward, x, label, **kw)
    numpy.testing.assert_allclose(loss2, ref_loss, **tol)
    assert lse.shape == ref_loss.shape and lse.dtype == cupy_sce.compute_dtype(x.dtype)
    numpy.testing.assert_allclose(lse, ref_lse, **tol)
    g = loss_grad if loss_grad is not None else numpy.ones(ref_loss.shape, x.dtype)
    grads = {
        'softmax': backend(cupy_sce.softmax_with_cross_entropy_grad, g, sm, label, **kw),
        'lse': backend(cupy_sce.backward, loss_grad, x, lse, label, **kw),
        'fused': backend(cupy_sce.forward_backward, x, label, loss_grad, **kw)[1],
    }
    for path, grad in grads.items():
        assert grad.dtype == x.dtype and grad.shape == x.shape, path
        tol = dict(grad_tol(path, x.dtype.type))
        if path == 'lse':  # the stored lse carries one rounding of |lse| * eps into exp(x - lse)
            finite = numpy.abs(ref_lse[numpy.isfinite(ref_lse)])
            lse_ulp = 4 * numpy.finfo(lse.dtype).eps * (finite.max() if finite.size else 0.0)
            tol['rtol'] += lse_ulp
            tol['atol'] += lse_ulp
        numpy.testing.assert_allclose(grad, ref_grad, err_msg=path, **tol)
    numpy.testing.assert_array_equal(x, x_before)
    numpy.testing.assert_array_equal(label, label_before)


# ----------------------------------------------------------------------------- feature variants

def feature_options(rng, K, features):
    """Keyword arguments that turn on exactly the feature bits ``features``."""
    from cupy_sce import _kernels
    options = {}
    if features & _kernels.F_WEIGHT:
        options['weight'] = rng.uniform(0.25, 2.0, K)
    if features & _kernels.F_SMOOTH:
        options['label_smoothing'] = 0.15
    if features & _kernels.F_ZLOSS:
        options['z_loss'] = 0.05
    if features & _kernels.F_SOFTCAP:
        options['softcap'] = 2.5
    return options


def check_features(backend, rng, dtype, shape, axis, label_kind, features, reduction='none'):
    """forward, backward from lse, fused and in-place forward+backward with the features
    ``features`` against the float64 reference of the loss family."""
    soft = label_kind == 'soft'
    x, label = make_case(rng, shape, axis, soft=soft, dtype=dtype, ignore_index=1,
                         label_dtype=numpy.int32 if label_kind == 'int32' else numpy.int64)
    options = feature_options(rng, shape[axis], features)
    if 'weight' in options:
        options['weight'] = options['weight'].astype(dtype)
    kw = dict(soft_label=soft, axis=axis, ignore_index=1, reduction=reduction, **options)
    ref = reference_family(x, label, **kw)
    tol = {numpy.float16: 4e-3, BFLOAT16: 3.2e-2, numpy.float32: 3e-5, numpy.float64: 1e-10}[dtype]

    def close(actual, expected):
        scale = max(1.0, float(numpy.max(numpy.abs(expected))))
        numpy.testing.assert_allclose(numpy.asarray(actual, numpy.float64), expected, rtol=tol, atol=tol * scale)
    loss, lse = backend(cupy_sce.forward, x, label, **kw)
    close(loss, ref['loss'])
    close(lse, ref['lse'])
    close(backend(cupy_sce.backward, None, x, lse, label, **kw), ref['grad'])
    loss, grad = backend(cupy_sce.forward_backward, x, label, **kw)
    close(loss, ref['loss'])
    close(grad, ref['grad'])
    logits = backend.asarray(x.copy())
    with backend.active():
        cupy_sce.forward_backward(logits, backend.asarray(label), inplace=True,
                                  **{k: backend.asarray(v) for k, v in kw.items()})
    numpy.testing.assert_array_equal(backend.to_numpy(logits), grad)


# ----------------------------------------------------------------------------- cluster kernels

# a segment of at most this many bytes per CTA (with the limits below): small rows need clusters
SEGMENT_BYTES = 256


def cluster_cases(dtype):
    """(K, expected cluster size): rows whose cache needs 2, 4, 8 CTAs, with 16-byte vectors and
    with scalar loads (K not a multiple of the vector width)."""
    from cupy_sce import _kernels
    itemsize, vec = numpy.dtype(dtype).itemsize, _kernels.vector_width(dtype)
    cases = []
    for cluster in _kernels.CLUSTER_SIZES:
        cases.append(((cluster * (SEGMENT_BYTES // 16) - 1) * vec, cluster))   # n_vec = 16c - 1
        cases.append((cluster * (SEGMENT_BYTES // itemsize) - 1, cluster))     # odd K: VEC = 1
    return cases


def run_cluster_cases(backend, rng, monkeypatch, launched):
    """Shrink the shared-memory limits so that rows of a few hundred classes take the cluster
    kernels (the same host logic picks them for K = 128256 on a GPU); check every output.
    ``launched``: the list the backend's runtime appends kernel names to."""
    from cupy_sce import _cupy_backend, _kernels
    monkeypatch.setattr(_cupy_backend, 'USE_CLUSTERS', True)
    # a block per row, as for large K (clusters split only such rows)
    monkeypatch.setattr(_cupy_backend, 'GROUP_TABLE', ((float('inf'), 64),))
    for dtype in DTYPES:
        state_slots = _cupy_backend.state_area_bytes(dtype)
        monkeypatch.setattr(_cupy_backend, 'SHARED_LIMIT', state_slots + SEGMENT_BYTES)
        monkeypatch.setattr(_cupy_backend, 'CLUSTER_SEGMENT_LIMIT', state_slots + SEGMENT_BYTES)
        for K, cluster in cluster_cases(dtype):
            for label_kind in ('int32', 'int64', 'soft'):
                soft = label_kind == 'soft'
                x, label = make_case(rng, (2, K), -1, soft=soft, dtype=dtype, ignore_index=1,
                                     label_dtype=numpy.int32 if label_kind == 'int32' else numpy.int64)
                before = len(launched)
                assert_all_outputs(backend, x, label, soft=soft, ignore_index=1)
                clusters = {_kernels.cluster_size(n) for n in launched[before:]}
                assert cluster in clusters, (dtype, K, cluster, launched[before:])
                if not soft:  # in place through a cluster: each CTA writes only its own segment
                    _, expected = backend(cupy_sce.forward_backward, x, label, ignore_index=1)
                    logits = backend.asarray(x.copy())
                    with backend.active():
                        cupy_sce.forward_backward(logits, backend.asarray(label), ignore_index=1,
                                                  inplace=True)
                    numpy.testing.assert_array_equal(backend.to_numpy(logits), expected)


def tuned_kernels(dtype):
    """The kernels scripts/tune_gpu.py times with its knobs: the featureless rows kernels of the
    forward and the fused forward+backward (every label type, vector width and row cache, and their
    cluster forms: 'clusters + bulk copy')."""
    from cupy_sce import _kernels
    timed = (_kernels.OPS['forward'], _kernels.OPS['forward_backward'])
    return tuple(n for n in _kernels.name_expressions(dtype)
                 if n.startswith('cupy_sce_rows') and _kernels.module_key(n) in [(op, 0) for op in timed])

def traced_peak(fn):
    """``(result, extra)``: ``fn()``'s result and the peak bytes NumPy allocated during it beyond what
    was allocated before (tracemalloc; what the result holds is included)."""
    import tracemalloc
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
