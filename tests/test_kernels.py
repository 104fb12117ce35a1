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
from cupy_sce.testing import harness
from conftest import Backend
from test_semantics import assert_all_outputs, make_case

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DTYPES = (numpy.float16, numpy.float32, numpy.float64)
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

@functools.lru_cache(maxsize=None)
def _ptx(dtype, options=()):
    """PTX for sm_90, compiled once per test session (the knob test compares with it)."""
    return _kernels.nvrtc_compile(dtype, 'compute_90', options).decode()


@pytest.mark.skipif(not _nvrtc_available(), reason='NVRTC not installed (pip install -e ".[test]")')
@pytest.mark.parametrize('arch', ['compute_80', 'compute_90'])
@pytest.mark.parametrize('dtype', DTYPES)
def test_nvrtc_compiles_every_instantiation(dtype, arch):
    """PTX for both architectures (machine code for sm_80 / sm_90: the register test below)."""
    ptx = _ptx(dtype) if arch == 'compute_90' else _kernels.nvrtc_compile(dtype, arch).decode()
    assert len(ptx) > 1000
    for name in ('cupy_sce_fused_rows', 'cupy_sce_fused_cluster', 'cupy_sce_row_max',
                 'cupy_sce_gather_label'):
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
    """A knob builds, and changes the code (test_scripts runs each on the harness)."""
    ptx = _ptx(dtype, _kernels.TUNING_KNOBS[knob])
    assert 'cupy_sce_fused_rows' in ptx and ptx != _ptx(dtype)
    if knob == 'exp2 ftz':
        assert 'ex2.approx.ftz.f32' in ptx


@pytest.mark.skipif(not _nvrtc_available(), reason='NVRTC not installed')
@pytest.mark.parametrize('arch', ['sm_80', 'sm_90'])
@pytest.mark.parametrize('dtype', DTYPES)
def test_registers_allow_the_largest_block(dtype, arch):
    """ptxas builds every instantiation for the architecture, and the kernels are bounded for
    1024-thread blocks (64 registers a thread: four 256-thread blocks share an SM); the host never
    launches larger ones."""
    usage = _kernels.register_usage(dtype, arch)
    assert len(usage) == len(_kernels.name_expressions(dtype))
    blocks = [group for _, group in _cupy_backend.GROUP_TABLE if group]
    assert max(blocks + [_cupy_backend.ROWS_BLOCK, _cupy_backend.CLUSTER_BLOCK]) <= 1024
    assert all(0 < regs <= 65536 // 1024 for regs in usage.values()), usage


@pytest.mark.skipif(not _nvrtc_available(), reason='NVRTC not installed')
def test_nvrtc_reports_compile_errors(tmp_path, monkeypatch):
    broken = tmp_path / 'kernels'
    broken.mkdir()
    for name in ('sce.cu', 'sce_common.cuh'):
        text = open(os.path.join(_kernels.KERNEL_DIR, name)).read()
        if name == 'sce.cu':
            text = text.replace('const A zero = A(0);', 'const A zero = A(0)')
        (broken / name).write_text(text)
    monkeypatch.setattr(_kernels, 'KERNEL_DIR', str(broken))
    with pytest.raises(RuntimeError, match=r'(?s)NVRTC failed for compute_90.*error: expected a ";"'):
        _kernels.nvrtc_compile(numpy.float32, 'compute_90')


def test_instantiation_list():
    for dtype in DTYPES:
        names = _kernels.name_expressions(dtype)
        assert len(names) == len(set(names)) == 16 + 18  # + cluster kernels: 3 labels x 2 VEC x 3 sizes
        assert all(n.startswith('cupy_sce_') for n in names)


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
    runtime = backend._harness.runtime
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
        x, _ = make_case(rng, (3, 64), -1, dtype=dtype)
        numpy.testing.assert_array_equal(backend(cupy_sce.row_max, x),
                                         x.astype(numpy.float64).max(-1, keepdims=True))
        numpy.testing.assert_array_equal(backend(cupy_sce.row_max, x[:, :63].copy()),
                                         x[:, :63].astype(numpy.float64).max(-1, keepdims=True))
    expected = {n for dt in DTYPES for n in _kernels.name_expressions(dt) if _kernels.cluster_size(n) == 1}
    assert set(runtime.launched) == expected, expected ^ set(runtime.launched)
    assert groups >= {1, 2, 4, 8, 16, 32, 256}, groups


@needs_harness
def test_cluster_instantiations_run_and_match(monkeypatch):
    """Every cupy_sce_fused_cluster instantiation (the rest: the test above), with 64-thread CTAs
    (two warps: the block reduction still crosses warps) to keep the fibers few."""
    backend = Backend('harness')
    runtime = backend._harness.runtime
    monkeypatch.setattr(_cupy_backend, 'CLUSTER_BLOCK', 64)
    run_cluster_cases(backend, numpy.random.default_rng(4), monkeypatch, runtime.launched)
    expected = {n for dt in DTYPES for n in _kernels.name_expressions(dt) if _kernels.cluster_size(n) > 1}
    assert set(runtime.launched) >= expected, expected - set(runtime.launched)


# a segment of at most this many bytes per CTA (with the limits below): small rows need clusters
SEGMENT_BYTES = 256


def cluster_cases(dtype):
    """(K, expected cluster size): rows whose cache needs 2, 4, 8 CTAs, with 16-byte vectors and
    with scalar loads (K not a multiple of the vector width)."""
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
    monkeypatch.setattr(_cupy_backend, 'USE_CLUSTERS', True)
    # a block per row, as for large K (clusters split only such rows)
    monkeypatch.setattr(_cupy_backend, 'GROUP_TABLE', ((float('inf'), 64),))
    for dtype in DTYPES:
        state_slots = _cupy_backend.STATE_SLOTS * 4 * cupy_sce.compute_dtype(dtype).itemsize
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


@needs_harness
@pytest.mark.parametrize('dtype', DTYPES)
def test_misaligned_buffers_fall_back_to_scalar_loads(dtype):
    backend = Backend('harness')
    x, label = make_case(numpy.random.default_rng(1), (4, 64), -1, dtype=dtype)
    storage = numpy.empty(x.size + 1, dtype)
    shifted = storage[1:].reshape(x.shape)  # C-contiguous, not 16-byte aligned
    shifted[...] = x
    assert shifted.ctypes.data % 16
    assert_all_outputs(backend, shifted, label)
    assert ', 1, ' in backend._harness.runtime.launched[-1]  # VEC = 1


@needs_harness
def test_in_place_every_group_size():
    backend = Backend('harness')
    rng = numpy.random.default_rng(2)
    for shape, axis in VARIANT_CASES:
        for dtype in (numpy.float16, numpy.float32):
            x, label = make_case(rng, shape, axis, dtype=dtype, ignore_index=0)
            expected_loss, _, expected_grad, _ = (numpy.asarray(a) for a in __import__('reference').reference(
                x, label, ignore_index=0, axis=axis))
            logits = x.copy()
            with backend.active():
                loss, grad = cupy_sce.forward_backward(logits, label, ignore_index=0, axis=axis, inplace=True)
            assert grad is logits
            tol = dict(rtol=2e-3, atol=2e-3) if dtype == numpy.float16 else dict(rtol=2e-5, atol=2e-6)
            numpy.testing.assert_allclose(logits, expected_grad, **tol)
            numpy.testing.assert_allclose(loss, expected_loss, **tol)


@needs_harness
def test_float16_true_class_gradient_is_rounded_once():
    """softmax - 1 is formed in float32: a float16 softmax of 0.9996 would give -0.00048 or 0."""
    backend = Backend('harness')
    x = numpy.array([[10.0, 2.0, 1.0, 0.0]], numpy.float16)
    label = numpy.array([[0]])
    grad = backend(cupy_sce.forward_backward, x, label)[1]
    p = numpy.exp(x.astype(numpy.float64) - numpy.logaddexp.reduce(x.astype(numpy.float64), -1))
    expected = (p[0, 0] - 1).astype(numpy.float16)
    assert grad[0, 0] == expected and grad[0, 0] != 0


@needs_harness
def test_label_check_costs_one_flag_and_can_be_skipped():
    backend = Backend('harness')
    runtime = backend._harness.runtime
    reads = []
    original = runtime.read_scalar
    runtime.read_scalar = lambda a: reads.append(1) or original(a)
    x, label = make_case(numpy.random.default_rng(3), (4, 9), -1)
    backend(cupy_sce.softmax_with_cross_entropy, x, label)
    assert len(reads) == 1
    with cupy_sce.label_check(False):
        backend(cupy_sce.softmax_with_cross_entropy, x, label)
    assert len(reads) == 1  # no device-to-host read without the check


# ---------------------------------------------------------------- 64-bit offsets

OFFSET_SCRIPT = r'''
import mmap, sys, numpy
from cupy_sce import _cupy_backend, _kernels
from cupy_sce.testing import harness

def sparse(n_elements, dtype):
    """A huge array whose untouched pages cost nothing (MAP_NORESERVE)."""
    dtype = numpy.dtype(dtype)
    buf = mmap.mmap(-1, n_elements * dtype.itemsize,
                    flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000))
    return numpy.frombuffer(buf, dtype)

def check(dtype, outer, K, inner, block_rows):
    """Run only the far blocks of the grid and compare their rows with NumPy."""
    n_rows = outer * inner
    vec = _kernels.vector_width(dtype) if inner == 1 and K % _kernels.vector_width(dtype) == 0 else 1
    group = _cupy_backend.group_size_for(K, inner, vec)
    grid, block = _cupy_backend.launch_geometry(n_rows, inner, group)
    columns = inner != 1 and group > 1
    rows_per_block = 32 if columns else block // group
    assert outer * K * inner > 2 ** 31
    x = sparse(outer * K * inner, dtype)
    label = numpy.zeros(n_rows, numpy.int64)
    loss = numpy.zeros(n_rows, dtype)
    lse = numpy.zeros(n_rows, numpy.float32)
    grad = sparse(outer * K * inner, dtype)
    bad = numpy.full(1, numpy.iinfo(numpy.uint64).max, numpy.uint64)
    blocks = [grid - 1]
    rows = range((grid - 1) * rows_per_block, min(grid * rows_per_block, n_rows))
    rng = numpy.random.default_rng(0)
    for r in rows:
        base = (r // inner) * K * inner + r % inner
        idx = base + numpy.arange(K) * inner
        x[idx] = rng.standard_normal(K)
        label[r] = rng.integers(0, K)
    label[rows[-1]] = K  # out of range: must be reported for exactly this row
    null = numpy.uint64(0)
    args = (x, label, null, null, null, loss, lse, null, grad, numpy.int64(n_rows), numpy.int64(K),
            numpy.int64(inner), numpy.int64(-100), numpy.int32(group), bad)
    shared = 32 * group * 16 if columns else ((group // 32) * 16 if group > 32 else 0)
    harness.launch(_kernels.fused_name(dtype, 'long long', vec, False), grid, block, args, shared_mem=shared,
                   blocks=blocks)
    assert int(bad[0]) == rows[-1], (int(bad[0]), rows[-1])
    for r in rows[:-1]:
        base = (r // inner) * K * inner + r % inner
        idx = base + numpy.arange(K) * inner
        xr = x[idx].astype(numpy.float64)
        ref_lse = numpy.logaddexp.reduce(xr)
        assert abs(lse[r] - ref_lse) < 1e-3 * max(1, abs(ref_lse)), (r, lse[r], ref_lse)
        assert abs(float(loss[r]) - (ref_lse - xr[label[r]])) < 2e-2, r
        g = numpy.exp(xr - ref_lse)
        g[label[r]] -= 1
        assert numpy.allclose(grad[idx].astype(numpy.float64), g, atol=2e-3), r
    print('ok', numpy.dtype(dtype).name, outer, K, inner, 'rows', rows[0], '..', rows[-1])

check(numpy.float32, 8200, 262144, 1, 1)       # contiguous rows: row * K > 2**31 (block per row)
check(numpy.float16, 2, 3, 2 ** 30 + 7, 256)   # strided: (row / inner) * K * inner + k * inner > 2**31
check(numpy.float16, 2, 40, 2 ** 26 + 3, 32)   # strided with 4 warps per 32 rows (columns)
check(numpy.float16, 70000, 32768, 1, 1)       # 2**31 < row * K < 2**32: caught if unsigned 32-bit
'''


@needs_harness
def test_64bit_offsets_on_huge_sparse_buffers():
    result = subprocess.run([sys.executable, '-c', OFFSET_SCRIPT], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count('ok ') == 4, result.stdout
