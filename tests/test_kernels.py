"""The CUDA kernels without a GPU: NVRTC compiles every instantiation, and the host harness
executes every instantiation through the CuPy backend's own host logic."""
import functools
import os
import subprocess
import sys

import numpy
import pytest

import cupy_sce
from cupy_sce import _cupy_backend, _kernels
from cupy_sce import testing as sce_testing
from cupy_sce.testing import harness
from helpers import (BFLOAT16, DTYPES, HALF_DTYPES, SEGMENT_BYTES, Backend, assert_all_outputs, check_features,
                     cluster_cases, make_case, run_cluster_cases, tuned_kernels)
from reference import reference

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
needs_harness = pytest.mark.skipif(harness.unavailable_reason() is not None,
                                   reason='host harness unavailable: {}'.format(harness.unavailable_reason()))


def _nvrtc_available():
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
        return True
    except Exception:
        return False


# ---------------------------------------------------------------- NVRTC

def _in_parallel(fn, names):
    """``fn(chunk)`` over the names split into one chunk per core (NVRTC releases the GIL)."""
    import concurrent.futures
    n = max(1, min(len(os.sched_getaffinity(0)), len(names) // 40))
    chunks = [names[i::n] for i in range(n)]
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(fn, chunks))


@functools.lru_cache(maxsize=None)
def _compiled(dtype, arch='compute_90', options=(), names=None):
    """(PTX, {name: mangled name}) of ``names`` (default: all), compiled once per test session."""
    names = tuple(names or _kernels.name_expressions(dtype))
    parts = _in_parallel(lambda chunk: _kernels.nvrtc_compile(dtype, arch, options, names=chunk, want_lowered=True),
                         names)
    lowered = {}
    for _, part in parts:
        lowered.update(part)
    return ''.join(ptx.decode() for ptx, _ in parts), lowered


def _ptx(dtype, options=(), arch='compute_90', names=None):
    return _compiled(dtype, arch, options, names)[0]


def _featureless(dtype):
    """The instantiations without features: the tuning knobs' and the register test's subject."""
    return tuple(n for n in _kernels.name_expressions(dtype) if harness.library_key(n) == 0)


# compute_90 for every dtype; compute_80 for float32 and bfloat16 (float16 and float64 take float32's
# code paths on both architectures; bfloat16's header has its own sm_80 paths).  The register tests
# below build sm_80 and sm_90 machine code for every dtype.
NVRTC_CASES = [(d, 'compute_90') for d in DTYPES] + [(d, 'compute_80') for d in DTYPES
                                                    if d in (numpy.float32, BFLOAT16)]


@pytest.mark.skipif(not _nvrtc_available(), reason='NVRTC not installed (pip install -e ".[test]")')
@pytest.mark.parametrize('dtype,arch', NVRTC_CASES)
def test_nvrtc_compiles_every_instantiation(dtype, arch):
    """PTX of every instantiation (machine code for sm_80 / sm_90: the register tests below)."""
    ptx = _ptx(dtype, arch=arch)
    assert len(ptx) > 1000
    assert ptx.count('.entry ') == len(_kernels.name_expressions(dtype))
    for name in ('cupy_sce_rows', 'cupy_sce_rows_cluster', 'cupy_sce_row_max', 'cupy_sce_gather_label'):
        assert name in ptx
    # the VEC instantiations really use 16-byte accesses
    assert 'ld.global.v4' in ptx or 'ld.global.nc.v4' in ptx or 'ld.global.v2.f64' in ptx
    if arch == 'compute_90':  # clusters: fixed dims, a cluster barrier, distributed shared memory
        assert '.reqnctapercluster' in ptx or '.explicitcluster' in ptx
        assert 'barrier.cluster' in ptx and 'mapa' in ptx
    else:
        assert 'trap' in ptx  # sm_80 has no clusters: those kernels only trap


@pytest.mark.skipif(not _nvrtc_available(), reason='NVRTC not installed')
@pytest.mark.parametrize('knob', sorted(_kernels.TUNING_KNOBS))
@pytest.mark.parametrize('dtype', [numpy.float16, numpy.float32])  # what tune_gpu.py times
def test_nvrtc_compiles_every_tuning_knob(dtype, knob):
    """A knob builds, and changes the code (test_scripts runs each on the harness), in the kernels
    tune_gpu.py times: the featureless rows kernels of the forward and the fused forward+backward
    (every label type, vector width and row cache)."""
    names = tuned_kernels(dtype)
    ptx = _ptx(dtype, _kernels.TUNING_KNOBS[knob], names=names)
    assert 'cupy_sce_rows' in ptx and ptx != _ptx(dtype, names=names)
    if knob == 'exp2 ftz':
        assert 'ex2.approx.ftz.f32' in ptx
    if knob == 'bulk copy':  # the bulk copy engine and its mbarrier on sm_90; ptxas assembles them
        assert 'cp.async.bulk.shared::cluster.global' in ptx and 'mbarrier.try_wait' in ptx
        if dtype == numpy.float32:  # the asm is the same for every dtype (ptxas takes 10 s a dtype)
            assert _kernels.nvrtc_compile(dtype, 'sm_90', _kernels.TUNING_KNOBS[knob], names=names)


# Register tests: ptxas on the featureless kernels and on every label type with all features (a
# feature only adds work, so these bound every variant); NVRTC compiles all.
def _register_subjects(dtype):
    return _featureless(dtype) + tuple(n for n in _kernels.name_expressions(dtype)
                                       if harness.library_key(n) == _kernels.ALL_FEATURES)


@functools.lru_cache(maxsize=None)
def _registers(dtype, arch):
    usage = {}
    for part in _in_parallel(lambda chunk: _kernels.ptxas_usage(dtype, arch, names=chunk),
                             _register_subjects(dtype)):
        usage.update(part)
    return usage


@pytest.mark.skipif(not _nvrtc_available(), reason='NVRTC not installed')
@pytest.mark.parametrize('arch', ['sm_80', 'sm_90'])
@pytest.mark.parametrize('dtype', DTYPES)
def test_registers_allow_the_largest_block(dtype, arch):
    """ptxas builds the instantiations for the architecture, and the kernels are bounded for
    1024-thread blocks (64 registers a thread: four 256-thread blocks share an SM); the host never
    launches larger ones."""
    usage = _registers(dtype, arch)
    assert len(usage) == len(_register_subjects(dtype))
    blocks = [group for _, group in _cupy_backend.GROUP_TABLE if group]
    assert max(blocks + [_cupy_backend.ROWS_BLOCK, _cupy_backend.CLUSTER_BLOCK]) <= 1024
    assert all(0 < regs <= 65536 // 1024 for regs, _ in usage.values()), usage
    if dtype != numpy.float64:
        # the kernels of long rows (no row cache), featureless or with a soft cap on 16-bit types:
        # no spills under that bound (the H200 measured 16-bit ones that spilled at half speed)
        long_rows = [n for n in usage if n.startswith('cupy_sce_rows<') and n.endswith('false>')]
        assert long_rows
        spilled = {n: usage[n][1] for n in long_rows if usage[n][1]}
        assert not spilled, spilled


def _entry_bodies(ptx):
    """{mangled entry name: its PTX body} of a PTX module."""
    import re
    bodies = {}
    for match in re.finditer(r'\.entry (\w+)\((.*?)\n}\n', ptx, re.S):
        bodies[match.group(1)] = match.group(2)
    return bodies


# cupy_sce_rows parameters (SCE_ROWS_PARAMS) that only a feature reads: (index, features needing it)
FEATURE_PARAMS = {5: _kernels.F_WEIGHT, 6: _kernels.F_WEIGHT | _kernels.F_SMOOTH, 15: _kernels.F_SMOOTH,
                  16: _kernels.F_ZLOSS, 17: _kernels.F_SOFTCAP}


@pytest.mark.skipif(not _nvrtc_available(), reason='NVRTC not installed')
@pytest.mark.parametrize('dtype', DTYPES)
def test_a_variant_pays_nothing_for_features_it_does_not_use(dtype):
    """Each feature is compile-time: a variant loads a feature's parameter (class weights, their
    sum, the smoothing, z-loss and cap values) exactly when it has the feature, so whatever the
    feature computes is absent from the others.  (Register counts are no such measure: ptxas
    gave a featureless float64 kernel 64 registers and its all-features twin 60.)"""
    ptx, lowered = _compiled(dtype, 'compute_90', (), None)  # the NVRTC test's compilation (one cache key)
    bodies = _entry_bodies(ptx)
    for op in _kernels.FEATURE_OPS:
        for label_type in _kernels.label_types(dtype):
            vec = _kernels.vector_width(dtype)
            names = {f: _kernels.rows_name(dtype, label_type, op, f, vec) for f in range(_kernels.ALL_FEATURES + 1)}
            for f, name in names.items():
                body = bodies[lowered[name]]
                for index, needs in FEATURE_PARAMS.items():
                    loaded = '{}_param_{}]'.format(lowered[name], index) in body
                    assert loaded == (f & needs == needs), (name, index, loaded)


@pytest.mark.skipif(not _nvrtc_available(), reason='NVRTC not installed')
def test_nvrtc_reports_compile_errors(tmp_path, monkeypatch):
    broken = tmp_path / 'kernels'
    broken.mkdir()
    for name in ('sce.cu', 'sce_common.cuh'):
        text = open(os.path.join(_kernels.KERNEL_DIR, name)).read()
        if name == 'sce.cu':
            text = text.replace('const A zero = A(0);', 'const A zero = A(0)', 1)
        (broken / name).write_text(text)
    monkeypatch.setattr(_kernels, 'KERNEL_DIR', str(broken))
    with pytest.raises(RuntimeError, match=r'(?s)NVRTC failed for compute_90.*error: expected a ";"'):
        _kernels.nvrtc_compile(numpy.float32, 'compute_90')


def test_instantiation_list():
    """Per dtype: lse 2; Paddle's forward with softmax 12 and grad op 6; forward 16 feature sets x
    (2 hard labels x 2 VEC + soft x 2 VEC x 2 caches) = 128; forward+backward 16 x 3 x 2 x 2 = 192;
    backward from lse 16 x 3 x 2 = 96; clusters (featureless ops that cache) 7 x 2 x 3 = 42; row
    max 2, gather 2."""
    for dtype in DTYPES:
        names = _kernels.name_expressions(dtype)
        assert len(names) == len(set(names)) == 2 + 12 + 6 + 128 + 192 + 96 + 42 + 2 + 2
        assert all(n.startswith('cupy_sce_') for n in names)
        # modules are compiled lazily: every name in exactly one, featureless ones together
        groups = _kernels.modules(dtype)
        assert sorted(n for g in groups.values() for n in g) == sorted(names)
        assert len(groups) == 6 + 3 * 15 + 2
    # the harness libraries partition the list the same way (one per feature set)
    every = [n for dt in harness.DTYPES for n in _kernels.name_expressions(dt)]
    assert sorted(n for key in range(_kernels.ALL_FEATURES + 1) for n in harness.library_names(key)) == sorted(every)


@needs_harness
def test_launch_plans_are_cached_per_problem_and_tuning(monkeypatch):
    """The backend computes a problem's plan once; a changed tuning constant is a new key."""
    backend = harness.backend()
    args = (numpy.float32, 'long long', 'forward', 0, 10, 1000, 1, 4, (False, 0))
    first = backend._plan(*args)
    assert first == _cupy_backend.launch_plan(*args) and backend._plan(*args) is first
    monkeypatch.setattr(_cupy_backend, 'GROUP_TABLE', ((float('inf'), 64),))
    retuned = backend._plan(*args)
    assert retuned.group == 64 and retuned == _cupy_backend.launch_plan(*args) and first.group != 64


def test_launch_plan():
    """The pure launch plan: kernel, geometry, row cache and shared memory from the problem alone."""
    plan = _cupy_backend.launch_plan(numpy.float32, 'long long', 'forward_backward', 0, 10, 1500, 1, 4)
    assert plan.name == 'cupy_sce_rows<float, long long, sce::OP_FORWARD_BACKWARD, 0, 4, true>'
    assert (plan.group, plan.block, plan.grid, plan.cluster, plan.cache_row) == (32, 256, 2, 1, True)
    assert plan.shared_mem == _cupy_backend.state_area_bytes(numpy.float32) + 8 * 1500 * 4
    plan = _cupy_backend.launch_plan(numpy.float32, 'long long', 'forward_backward', 0, 10, 1000, 1, 4)
    assert (plan.group, plan.block, plan.grid, plan.cache_row) == (16, 256, 1, False)  # 16 rows: 64 KB
    plan = _cupy_backend.launch_plan(numpy.float32, 'long long', 'forward', 5, 10, 1000, 1, 4)
    assert plan.name.endswith('sce::OP_FORWARD, 5, 4, false>') and not plan.cache_row  # no pass 2
    plan = _cupy_backend.launch_plan(numpy.float16, 'float', 'forward_backward', 3, 7, 128256, 1, 8)
    assert (plan.group, plan.block, plan.grid, plan.cache_row) == (256, 256, 7, False)  # re-read
    assert plan.shared_mem == 8 * 6 * 4
    plan = _cupy_backend.launch_plan(numpy.float64, 'int', 'backward_lse', 0, 100, 40, 33, 1)
    assert (plan.group, plan.block, plan.grid) == (4, 128, 4)  # columns: 32 rows a block
    assert plan.shared_mem == 32 * 4 * 6 * 8
    plan = _cupy_backend.launch_plan(numpy.float32, 'int', 'forward_backward', 0, 3, 128256, 1, 4, (True, 227 * 1024))
    assert plan.cluster == 1  # clusters are off by default (USE_CLUSTERS)


@needs_harness
def test_layout_constants_match_the_compiled_kernels():
    """The host's shared-memory layout is the kernels': state size, slots, column rows."""
    for acc_bytes in (4, 8):
        state_bytes, slots, column_rows = harness.layout_constants(acc_bytes)
        assert state_bytes == _cupy_backend.STATE_FIELDS * acc_bytes
        assert slots == _cupy_backend.STATE_SLOTS
        assert column_rows == _cupy_backend.COLUMN_ROWS


# ---------------------------------------------------------------- geometry table

@pytest.mark.parametrize('K,inner,vec,group', [
    (7, 3, 1, 1), (40, 3, 1, 4), (5000, 2, 1, 8),  # strided: warps that split the classes ("columns")
    (1, 1, 1, 1), (2, 1, 1, 1), (10, 1, 1, 1), (64, 1, 4, 1),  # <= 16 chunks: a thread per row
    (17, 1, 1, 2), (128, 1, 4, 2), (33, 1, 1, 4), (1000, 1, 4, 16), (2048, 1, 4, 32),
    (4096, 1, 4, 32), (1025, 1, 1, 256), (32000, 1, 4, 256),
    (32768, 1, 4, 256), (32772, 1, 4, 256), (128256, 1, 4, 256), (128256, 1, 8, 256)])
def test_group_size_table(K, inner, vec, group):
    assert _cupy_backend.group_size_for(K, inner, vec) == group


# ---------------------------------------------------------------- every variant on the harness

VARIANT_CASES = [  # (shape, axis): thread, sub-warp, warp, block of 256 per row, strided, K == 1
    ((5, 64), -1), ((4, 63), -1), ((9, 8), -1), ((3, 7, 5), 1), ((2, 4097), -1), ((2, 9001), -1),
    ((2, 33000), -1), ((6, 1), -1), ((1, 31), 0), ((3, 100), -1), ((2, 2000), -1),
    ((2, 100, 40), 1), ((3, 40, 33), 1)]  # columns: 8 and 4 warps per 32 strided rows


@needs_harness
def test_every_instantiation_runs_and_matches(monkeypatch):
    """All semantic checks on every (dtype, label type, VEC, group size) the backend launches;
    the kernels launched must be exactly the instantiation list."""
    backend = Backend('harness')
    runtime = backend.runtime
    rng = numpy.random.default_rng(0)
    groups = set()
    real_group_size = _cupy_backend.group_size_for

    def recording_group_size(K, inner, vec):
        group = real_group_size(K, inner, vec)
        groups.add(group)
        return group
    monkeypatch.setattr(_cupy_backend, 'group_size_for', recording_group_size)
    for dtype in DTYPES:
        for shape, axis in VARIANT_CASES:
            for label_kind in ('int32', 'int64', 'soft'):
                soft = label_kind == 'soft'
                x, label = make_case(rng, shape, axis, soft=soft, dtype=dtype,
                                     label_dtype=numpy.int32 if label_kind == 'int32' else numpy.int64,
                                     ignore_index=1 if shape[axis] > 1 else -100)
                assert_all_outputs(backend, x, label, soft=soft, axis=axis,
                                   ignore_index=1 if shape[axis] > 1 else -100)
                if not soft:
                    picked = backend(cupy_sce.gather_label_logit, x, label, axis=axis,
                                     ignore_index=1 if shape[axis] > 1 else -100)
                    assert picked.shape == label.shape if label.ndim == x.ndim else True
            x, _ = make_case(rng, shape, axis, dtype=dtype)
            numpy.testing.assert_allclose(backend(cupy_sce.logsumexp, x, axis=axis),
                                          numpy.logaddexp.reduce(x.astype(numpy.float64), axis, keepdims=True),
                                          rtol=1e-5 if dtype != numpy.float64 else 1e-12)
        x, _ = make_case(rng, (3, 64), -1, dtype=dtype)
        numpy.testing.assert_array_equal(backend(cupy_sce.row_max, x),
                                         x.astype(numpy.float64).max(-1, keepdims=True))
        numpy.testing.assert_array_equal(backend(cupy_sce.row_max, x[:, :63].copy()),
                                         x[:, :63].astype(numpy.float64).max(-1, keepdims=True))
    expected = {n for n in harness.library_names(0) if _kernels.cluster_size(n) == 1}
    assert set(runtime.launched) == expected, expected ^ set(runtime.launched)
    assert groups >= {1, 2, 4, 8, 16, 32, 256}, groups


FEATURE_CASES = [  # (shape, axis): 16-byte vectors, scalar, a warp per row, strided, a block per row
    ((5, 64), -1), ((3, 63), -1), ((2, 2000), -1), ((3, 7, 5), 1), ((2, 4097), -1)]
# a block per row whose cache fits 48 KiB, with 16-byte vectors (CACHE_ROW and VEC together)
VEC_CACHE_CASE = {numpy.float16: ((2, 16384), -1), BFLOAT16: ((2, 16384), -1), numpy.float32: ((2, 8192), -1),
                  numpy.float64: ((2, 4096), -1)}


@needs_harness
def test_every_feature_instantiation_runs_and_matches():
    """Every instantiation with features (the featureless ones: the test above), each against
    the float64 reference; the kernels launched must be exactly the feature instantiations."""
    harness.prebuild(range(1, _kernels.ALL_FEATURES + 1))  # on every core at once
    backend = Backend('harness')
    runtime = backend.runtime
    rng = numpy.random.default_rng(5)
    for features in range(1, _kernels.ALL_FEATURES + 1):
        for dtype in DTYPES:
            for shape, axis in FEATURE_CASES + [VEC_CACHE_CASE[dtype]]:
                for label_kind in ('int32', 'int64', 'soft'):
                    check_features(backend, rng, dtype, shape, axis, label_kind, features)
    launched = {n for n in runtime.launched if harness.library_key(n)}
    expected = {n for key in range(1, _kernels.ALL_FEATURES + 1) for n in harness.library_names(key)}
    assert launched == expected, expected ^ launched


@needs_harness
@pytest.mark.parametrize('reduction', ['none', 'mean', 'sum'])
def test_all_features_together(reduction):
    """Every feature at once on each operation, label type, layout and reduction: the probe of
    the feature mutants (tests/test_mutations.py), which builds one harness library."""
    backend = Backend('harness')
    rng = numpy.random.default_rng(6)
    for dtype in (numpy.float32, numpy.float64):
        for shape, axis in FEATURE_CASES:
            for label_kind in ('int64', 'soft'):
                check_features(backend, rng, dtype, shape, axis, label_kind, _kernels.ALL_FEATURES, reduction)


@needs_harness
def test_cluster_instantiations_run_and_match(monkeypatch):
    """Every cupy_sce_fused_cluster instantiation (the rest: the test above), with 64-thread CTAs
    (two warps: the block reduction still crosses warps) to keep the fibers few."""
    backend = Backend('harness')
    runtime = backend.runtime
    monkeypatch.setattr(_cupy_backend, 'CLUSTER_BLOCK', 64)
    run_cluster_cases(backend, numpy.random.default_rng(4), monkeypatch, runtime.launched)
    expected = {n for n in harness.library_names(0) if _kernels.cluster_size(n) > 1}
    assert set(runtime.launched) >= expected, expected - set(runtime.launched)


@needs_harness
@pytest.mark.parametrize('dtype', DTYPES)
def test_misaligned_buffers_are_staged_for_vector_loads(dtype):
    """A C-contiguous view that does not start on 16 bytes is staged in an aligned copy: the
    launch keeps its 16-byte vectors, and so the aligned array's summation order and bits (the
    scalar-load variant sums in another order); in place the result is copied back."""
    backend = Backend('harness')
    x, label = make_case(numpy.random.default_rng(1), (4, 64), -1, dtype=dtype)
    storage = numpy.empty(x.size + 1, dtype)
    shifted = storage[1:].reshape(x.shape)  # C-contiguous, not 16-byte aligned
    shifted[...] = x
    assert shifted.ctypes.data % 16
    assert_all_outputs(backend, shifted, label)
    vec = ', {}, '.format(16 // numpy.dtype(dtype).itemsize)
    assert vec in backend.runtime.launched[-1]
    aligned = backend(cupy_sce.forward_backward, x, label)
    numpy.testing.assert_array_equal(backend(cupy_sce.forward_backward, shifted, label)[1], aligned[1])
    with backend.active():
        cupy_sce.forward_backward(shifted, label, inplace=True)
    numpy.testing.assert_array_equal(shifted, aligned[1])


# Cached launches the staging knobs change.  Short rows a thread each (group_size 1; the block's
# 256 rows within the 48 KiB SHARED_LIMIT), 301 rows (a block of 256 and a partial one of 45, whose
# span is no whole number of 16-byte words: block_copy's element tail runs): float32
# K = 10 and 7 (scalar loads), 32 (16-byte vectors); float16 K = 64; float64 K = 6.  A block per
# row (SCE_BULK_STAGE only; 3 rows): float32 K = 5000 (16-byte vectors) and 4099 (scalar loads:
# the rows start 16-byte aligned one time in four, so the bulk copy and the threads' copy both
# run), float16 K = 9000, float64 K = 3000.
STAGED_SHORT = [(numpy.float32, 10, 301), (numpy.float32, 7, 301), (numpy.float32, 32, 301),
                (numpy.float16, 64, 301), (numpy.float64, 6, 301)]
STAGED_LONG = [(numpy.float32, 5000, 3), (numpy.float32, 4099, 3), (numpy.float16, 9000, 3),
               (numpy.float64, 3000, 3)]
STAGING_KNOBS = {'stage short rows': STAGED_SHORT, 'bulk copy': STAGED_SHORT + STAGED_LONG}


def _staging_calls(x, label, soft, features):
    """The calls a staged launch serves: forward+backward out of place and in place, and (without
    features: Paddle's op has none) the softmax."""
    kw = dict(soft_label=soft, ignore_index=1, **features)
    results = {'forward+backward': cupy_sce.forward_backward(x, label, **kw)}
    if not features:
        results['softmax'] = cupy_sce.softmax_with_cross_entropy(x, label, soft_label=soft, ignore_index=1,
                                                                 return_softmax=True)
    logits = x.copy()
    loss, grad = cupy_sce.forward_backward(logits, label, inplace=True, **kw)
    assert grad is logits
    results['forward+backward in place'] = loss, grad
    return results


STAGING_DTYPES = [numpy.float16, numpy.float32, numpy.float64]


def _knob_names(dtypes):
    """The kernels the staging test launches: the cached rows kernels (and the cluster kernels) of
    the featureless and all-features sets, and the helpers (the label check before an in-place
    call gathers the labels' logits)."""
    return [n for dtype in dtypes for n in _kernels.name_expressions(dtype)
            if harness.library_key(n) in (0, _kernels.ALL_FEATURES) and not n.endswith(', false>')]


def _knob_backend(knob, dtypes):
    return _cupy_backend.CupyBackend(harness.HarnessRuntime(_kernels.TUNING_KNOBS[knob], dtypes=dtypes,
                                                            names=_knob_names(dtypes)))


@pytest.fixture(scope='module')
def staging_libraries():
    """Build the staging knobs' harness libraries (two feature sets each) on every core at once, as
    HarnessRuntime would build them one at a time when first launched (the same names, so the same
    cached files)."""
    import concurrent.futures
    names = set(_knob_names(STAGING_DTYPES))
    jobs = [(key, [n for n in harness.library_names(key, STAGING_DTYPES) if n in names], _kernels.TUNING_KNOBS[knob])
            for knob in STAGING_KNOBS for key in (0, _kernels.ALL_FEATURES)]
    with concurrent.futures.ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(lambda job: harness.library(*job), jobs))


@needs_harness
@pytest.mark.parametrize('knob', sorted(STAGING_KNOBS))
def test_staging_knobs_give_the_default_bits(knob, monkeypatch, staging_libraries):
    """The tuning knobs that fill the row cache before pass 1 (tune_gpu.py): SCE_STAGE_ROWS (a block
    of one-thread rows reads its rows, and writes their softmax or gradient back, as one span in
    16-byte words) and SCE_BULK_STAGE (every cached launch, and a cluster CTA's segment, filled by
    the bulk copy engine; on the harness a copy at once).  Each must give the default kernels'
    bits -- the softmax, forward+backward out of place and in place, hard and soft labels, no
    features and all four, full and partial blocks, with and without 16-byte loads, and (bulk copy)
    rows split over clusters -- and must be what ran."""
    dtypes = STAGING_DTYPES
    staged = _knob_backend(knob, dtypes)
    default = Backend('harness')
    rng = numpy.random.default_rng(11)

    def compare(x, label, soft, features, what_ran):
        with default.active():
            expected = _staging_calls(x, label, soft, features)
        before = len(staged.runtime.launched)
        with sce_testing.use_backend(staged):
            got = _staging_calls(x, label, soft, features)
        rows_launched = [n for n in staged.runtime.launched[before:] if n.startswith('cupy_sce_rows')]
        assert len(rows_launched) == len(expected) and all(what_ran(n) for n in rows_launched), rows_launched
        for what in expected:
            for a, b in zip(expected[what], got[what]):
                numpy.testing.assert_array_equal(a, b, err_msg='{} K={} {} soft={} {}'.format(
                    x.dtype, x.shape[-1], what, soft, sorted(features)))

    for dtype, K, n in STAGING_KNOBS[knob]:
        if n > 256:  # the short rows are one-thread rows (what SCE_STAGE_ROWS stages)
            assert _cupy_backend.group_size_for(K, 1, _kernels.vector_width(dtype) if K % _kernels.vector_width(dtype) == 0 else 1) == 1
        for soft, features in ((False, {}), (True, {}), (False, dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0))):
            x, label = make_case(rng, (n, K), -1, dtype=dtype, soft=soft, ignore_index=1)
            if features:
                features = dict(features, weight=(rng.random(K) + 0.5).astype(dtype))
            compare(x, label, soft, features, lambda name: name.endswith(', true>'))
    if knob == 'bulk copy':  # rows split over clusters (shrunken limits, as run_cluster_cases)
        monkeypatch.setattr(_cupy_backend, 'USE_CLUSTERS', True)
        monkeypatch.setattr(_cupy_backend, 'GROUP_TABLE', ((float('inf'), 64),))
        monkeypatch.setattr(_cupy_backend, 'CLUSTER_BLOCK', 64)
        for dtype in dtypes:
            limit = _cupy_backend.state_area_bytes(dtype) + SEGMENT_BYTES
            monkeypatch.setattr(_cupy_backend, 'SHARED_LIMIT', limit)
            monkeypatch.setattr(_cupy_backend, 'CLUSTER_SEGMENT_LIMIT', limit)
            for K, cluster in cluster_cases(dtype):
                x, label = make_case(rng, (2, K), -1, dtype=dtype, ignore_index=1)
                compare(x, label, False, {}, lambda name, c=cluster: _kernels.cluster_size(name) == c)


@needs_harness
def test_in_place_every_group_size():
    backend = Backend('harness')
    rng = numpy.random.default_rng(2)
    for shape, axis in VARIANT_CASES:
        for dtype in (numpy.float16, numpy.float32):
            x, label = make_case(rng, shape, axis, dtype=dtype, ignore_index=0)
            expected_loss, _, expected_grad, _ = (numpy.asarray(a) for a in reference(
                x, label, ignore_index=0, axis=axis))
            logits = x.copy()
            with backend.active():
                loss, grad = cupy_sce.forward_backward(logits, label, ignore_index=0, axis=axis, inplace=True)
            assert grad is logits
            tol = dict(rtol=2e-3, atol=2e-3) if dtype == numpy.float16 else dict(rtol=2e-5, atol=2e-6)
            numpy.testing.assert_allclose(logits, expected_grad, **tol)
            numpy.testing.assert_allclose(loss, expected_loss, **tol)


@needs_harness
@pytest.mark.parametrize('dtype', HALF_DTYPES)
def test_16_bit_gradient_is_rounded_once(dtype):
    """softmax - 1 is formed in float32 and rounded once to nearest: a 16-bit softmax of 0.9996
    would give -0.00048 or 0, a conversion that truncates gives other bits, and in the confident
    third row (loss 2.3e-8) softmax - 1 from the float32 softmax (1.0f) would be 0; every element
    equals the float64 gradient rounded to the dtype (none lies near a rounding tie)."""
    backend = Backend('harness')
    x = numpy.array([[10.0, 2.0, 1.0, 0.0, 0.5], [3.0, 2.5, -1.0, 0.25, 1.0], [0.0, -18.0, -19.0, -20.0, -21.0]],
                    dtype)
    label = numpy.array([[0], [2], [0]])
    grad = backend(cupy_sce.forward_backward, x, label)[1]
    x64 = x.astype(numpy.float64)
    p = numpy.exp(x64 - numpy.logaddexp.reduce(x64, -1, keepdims=True))
    numpy.put_along_axis(p, label, numpy.take_along_axis(p, label, -1) - 1, -1)
    numpy.testing.assert_array_equal(grad, p.astype(dtype))
    assert grad[0, 0] != 0 and (dtype == numpy.float16 or grad[2, 0] != 0)


@needs_harness
def test_label_check_costs_one_flag_and_can_be_skipped():
    backend = Backend('harness')
    runtime = backend.runtime
    reads = []
    original = runtime.read_scalar
    runtime.read_scalar = lambda a: reads.append(1) or original(a)
    x, label = make_case(numpy.random.default_rng(3), (4, 9), -1)
    backend(cupy_sce.softmax_with_cross_entropy, x, label)
    assert len(reads) == 1
    with cupy_sce.label_check(False):
        backend(cupy_sce.softmax_with_cross_entropy, x, label)
        backend(cupy_sce.softmax_with_cross_entropy, x, label.astype(numpy.uint64))
    assert len(reads) == 1  # no device-to-host read without the check, uint64 labels included
    backend(cupy_sce.softmax_with_cross_entropy, x, label.astype(numpy.uint64))
    assert len(reads) == 2  # with it, the one flag


# ---------------------------------------------------------------- 64-bit offsets

@needs_harness
def test_64bit_offsets_on_huge_sparse_buffers():
    """tests/programs/huge_offsets.py, in a process of its own: it maps huge sparse buffers."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
    result = subprocess.run([sys.executable, os.path.join(HERE, 'programs', 'huge_offsets.py')],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count('ok ') == 4, result.stdout
