"""The CuPy backend on a real GPU, compared with the NumPy backend (numpy_cupy_allclose style).

Skipped without a GPU; the same kernels and host logic run on the CPU in
test_kernels.py / test_semantics.py (harness backend) on every machine.
"""
import numpy
import pytest

import cupy_sce
from cupy_sce import testing as sce_testing
from helpers import Backend, assert_all_outputs, gpu_available, make_case, run_cluster_cases

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu_available(), reason='no CUDA GPU present (CuPy cannot allocate)')]

if gpu_available():
    import cupy
    from cupy import testing
    allclose = testing.numpy_cupy_allclose
else:  # keep the decorators importable on machines without a GPU
    def allclose(**kw):
        return lambda f: f

ODD_K = [1, 7, 31, 33, 1000, 1025, 4097, 32000]
TOL = dict(rtol=2e-5, atol=2e-6, contiguous_check=False)
TOL16 = dict(rtol=3e-3, atol=3e-3, contiguous_check=False)


def _case(xp, shape, axis, dtype=numpy.float32, soft=False, ignore_index=-100, label_dtype=numpy.int64):
    x, label = make_case(numpy.random.default_rng(sum(shape) + axis), shape, axis, soft=soft,
                         ignore_index=ignore_index, dtype=dtype, label_dtype=label_dtype)
    return xp.asarray(x), xp.asarray(label)


@pytest.mark.parametrize('K', ODD_K)
@pytest.mark.parametrize('dtype', [numpy.float16, numpy.float32, numpy.float64])
@allclose(**TOL16)
def test_forward_with_softmax(xp, K, dtype):
    x, label = _case(xp, (9, K), -1, dtype=dtype, ignore_index=min(K - 1, 3))
    loss, sm = cupy_sce.softmax_with_cross_entropy(x, label, ignore_index=min(K - 1, 3), return_softmax=True)
    return xp.concatenate([loss.astype(xp.float64).ravel(), sm.astype(xp.float64).ravel()])


@pytest.mark.parametrize('K', ODD_K)
@pytest.mark.parametrize('soft', [False, True])
@pytest.mark.parametrize('path', ['fused', 'lse', 'softmax'])
@allclose(**TOL)
def test_gradients(xp, K, soft, path):
    x, label = _case(xp, (5, K), -1, soft=soft)
    g = xp.asarray(numpy.random.default_rng(K).uniform(0.5, 2, (5, 1)).astype(numpy.float32))
    if path == 'fused':
        return cupy_sce.forward_backward(x, label, g, soft_label=soft)[1]
    if path == 'lse':
        _, lse = cupy_sce.forward(x, label, soft_label=soft)
        return cupy_sce.backward(g, x, lse, label, soft_label=soft)
    _, sm = cupy_sce.softmax_with_cross_entropy(x, label, soft_label=soft, return_softmax=True)
    return cupy_sce.softmax_with_cross_entropy_grad(g, sm, label, soft_label=soft)


@pytest.mark.parametrize('shape,axis', [((4, 33, 7), 1), ((2, 3, 1025), 1), ((1000, 3), 0),
                                        ((2, 7, 3, 5), 2)])
@pytest.mark.parametrize('label_dtype', [numpy.int32, numpy.int64, numpy.uint8])
@allclose(**TOL)
def test_strided_axes(xp, shape, axis, label_dtype):
    x, label = _case(xp, shape, axis, label_dtype=label_dtype, ignore_index=2)
    loss, grad = cupy_sce.forward_backward(x, label, ignore_index=2, axis=axis)
    return xp.concatenate([loss.ravel(), grad.ravel()])


@allclose(**TOL)
def test_non_contiguous_and_negative_strides(xp):
    x, label = _case(xp, (8, 40, 6), 1)
    parts = []
    halved = xp.where(label < 0, label, label // 2)  # labels for the K / 2 classes of x[:, ::2]
    for view, lab in ((x[::-1], label[::-1]), (x[:, ::2], halved), (xp.asfortranarray(x), label)):
        parts.append(cupy_sce.forward_backward(view, lab, axis=1)[1].ravel())
    return xp.concatenate(parts)


def test_in_place_on_device():
    x, label = _case(cupy, (64, 1000), -1)
    expected = cupy_sce.forward_backward(x, label)[1]
    logits = x.copy()
    loss, grad = cupy_sce.forward_backward(logits, label, inplace=True)
    assert grad is logits
    cupy.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-7)
    logits = x.copy()
    _, lse = cupy_sce.forward(logits, label)
    assert cupy_sce.backward(None, logits, lse, label, out=logits) is logits
    cupy.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_out_of_range_label_raises_same_error():
    x, label = _case(cupy, (6, 1000), -1)
    label[4, 0] = 1000
    with pytest.raises(IndexError, match=r'label value 1000 at position \(4, 0\) is out of range for K=1000'):
        cupy_sce.softmax_with_cross_entropy(x, label)
    with cupy_sce.label_check(False):
        loss = cupy_sce.softmax_with_cross_entropy(x, label)
    assert bool(cupy.isnan(loss[4, 0]))


def test_mixing_numpy_and_cupy_is_a_type_error():
    x, label = _case(cupy, (3, 5), -1)
    with pytest.raises(TypeError, match='cannot mix numpy and cupy'):
        cupy_sce.softmax_with_cross_entropy(x, cupy.asnumpy(label))
    with pytest.raises(TypeError, match='cannot mix numpy and cupy'):
        cupy_sce.backward(numpy.ones((3, 1), numpy.float32), x, cupy.zeros((3, 1)), label)


def test_inputs_untouched_and_float16():
    x, label = _case(cupy, (8, 4097), -1, dtype=numpy.float16)
    before = x.copy()
    loss, grad = cupy_sce.forward_backward(x, label)
    cupy.testing.assert_array_equal(x, before)
    assert loss.dtype == grad.dtype == numpy.float16


def test_64bit_offsets_on_device():
    """8192 x 262144 float16 (4 GiB): rows beyond 2**31 elements."""
    free, _ = cupy.cuda.runtime.memGetInfo()
    if free < 12 * 2 ** 30:
        pytest.skip('needs 12 GiB of free GPU memory')
    n, K = 8192, 262144
    x = cupy.zeros((n, K), cupy.float16)
    x[-1, 7] = 4.0
    label = cupy.full((n, 1), 7, cupy.int64)
    loss, lse = cupy_sce.forward(x, label)
    expected_last = float(numpy.logaddexp.reduce(numpy.r_[4.0, numpy.zeros(K - 1)]) - 4.0)
    assert abs(float(loss[-1, 0]) - expected_last) < 1e-2
    assert abs(float(loss[0, 0]) - numpy.log(K)) < 1e-2
    del x


@pytest.mark.parametrize('K,dtype', [(128256, numpy.float32), (128256, numpy.float16), (50257, numpy.float32),
                                     (32000, numpy.float64)])
@pytest.mark.parametrize('soft', [False, True])
def test_large_rows_through_clusters(K, dtype, soft):
    """Rows too large for one CTA's shared memory: the cluster kernels (sm_90) or the re-read."""
    x, label = make_case(numpy.random.default_rng(K), (3, K), -1, soft=soft, dtype=dtype, ignore_index=1)
    backend = Backend('cupy')
    assert_all_outputs(backend, x, label, soft=soft, ignore_index=1)
    if not soft:
        xs, labels = cupy.asarray(x), cupy.asarray(label)
        expected = cupy_sce.forward_backward(xs, labels, ignore_index=1)[1]
        cupy_sce.forward_backward(xs, labels, ignore_index=1, inplace=True)
        cupy.testing.assert_array_equal(xs, expected)


def test_every_cluster_size_on_device(monkeypatch):
    """Shrunken shared-memory limits send rows of a few hundred classes through clusters of 2, 4
    and 8 CTAs, every dtype and label kind (the harness runs the same cases on the CPU)."""
    runtime = sce_testing.default_backend(cupy).runtime
    if not runtime.limits()[0]:
        pytest.skip('thread block clusters need compute capability 9.0')
    launched = []
    original = runtime.kernel
    monkeypatch.setattr(runtime, 'kernel', lambda dtype, name: launched.append(name) or original(dtype, name))
    run_cluster_cases(Backend('cupy'), numpy.random.default_rng(5), monkeypatch, launched)
