"""cupy_sce.dask: the ops on Dask arrays whose rows and classes are split over chunks, against the
single-array functions, on the threaded scheduler and on a real ``distributed.LocalCluster`` with
worker processes (started and closed here); memory bounded by the chunks, not the problem."""
import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dask
import dask.array as da

import cupy_sce
from cupy_sce import dask as sce_dask
from helpers import traced_peak

TOL = {numpy.float32: dict(rtol=3e-5, atol=3e-6), numpy.float64: dict(rtol=1e-11, atol=1e-13)}


@st.composite
def problems(draw):
    """(logits, label, chunks, axis, keywords, reduction): rank 1-3, odd sizes, every axis chunked."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 9)) for _ in range(ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    K = draw(st.integers(1, 40))
    shape = shape[:axis % ndim] + (K,) + shape[axis % ndim + 1:]
    chunks = tuple(draw(st.integers(1, n)) for n in shape)
    dtype = draw(st.sampled_from([numpy.float32, numpy.float64]))
    soft = draw(st.booleans())
    use_softmax = draw(st.booleans())
    rng = numpy.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    if not use_softmax:  # probabilities as input
        e = numpy.exp(x - x.max(axis, keepdims=True))
        x = (e / e.sum(axis, keepdims=True) + 1e-3).astype(dtype)
    row_shape = list(shape)
    row_shape[axis] = 1
    if soft:
        label = rng.random(shape) * (rng.random(shape) < 0.7)
        label = (label / numpy.maximum(label.sum(axis, keepdims=True), 1e-3)).astype(dtype)
    else:
        label = rng.integers(0, K, row_shape)
        label[rng.random(row_shape) < 0.2] = -100
        if draw(st.booleans()):
            label = numpy.squeeze(label, axis)
    kw = {}
    if draw(st.booleans()):
        kw['weight'] = (rng.integers(1, 25, K) / 8.0).astype(dtype)
    if draw(st.booleans()):
        kw['label_smoothing'] = draw(st.sampled_from([0.1, 0.5]))
    if use_softmax and draw(st.booleans()):
        kw['z_loss'] = draw(st.sampled_from([1e-4, 0.05]))
    if use_softmax and draw(st.booleans()):
        kw['softcap'] = draw(st.sampled_from([1.5, 15.0]))
    kw.update(soft_label=soft, axis=axis, use_softmax=use_softmax)
    return x, label, chunks, kw, draw(st.sampled_from(['none', 'mean', 'sum']))


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(problems())
def test_every_function_matches_the_single_array_call(problem):
    x, label, chunks, kw, reduction = problem
    dx = da.from_array(x, chunks=chunks)
    dlabel = da.from_array(label, chunks=label.shape) if label.ndim else label
    tol = TOL[x.dtype.type]
    want_loss, want_lse = cupy_sce.forward(x, label, reduction=reduction, **kw)
    loss_grad = (numpy.random.default_rng(1).uniform(-2, 2, want_loss.shape).astype(x.dtype) if reduction == 'none'
                 else 0.75)
    _, want_grad = cupy_sce.forward_backward(x, label, loss_grad, reduction=reduction, **kw)
    with dask.config.set(scheduler='threads'):
        loss, lse = sce_dask.forward(dx, dlabel, reduction=reduction, **kw)
        fused_loss, grad = sce_dask.forward_backward(dx, dlabel, loss_grad, reduction=reduction, **kw)
        lse_grad = sce_dask.backward(loss_grad, dx, lse, dlabel, reduction=reduction, **kw)
        ce = sce_dask.cross_entropy(dx, dlabel, reduction=reduction, **kw)
        loss, lse, fused_loss, grad, lse_grad, ce = dask.compute(loss, lse, fused_loss, grad, lse_grad, ce)
    if not kw['use_softmax']:
        assert lse is None and want_lse is None
        lse = want_lse = numpy.zeros(1)
    want_ce = cupy_sce.cross_entropy(x, label, reduction=reduction, **kw)
    for name, got, want in (('loss', loss, want_loss), ('lse', lse, want_lse), ('fused loss', fused_loss, want_loss),
                            ('grad', grad, want_grad), ('backward', lse_grad, want_grad), ('ce', ce, want_ce)):
        assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape)
        numpy.testing.assert_allclose(got, want, err_msg=name, **tol)


def test_a_bad_label_raises_when_computed():
    x = numpy.random.default_rng(2).standard_normal((6, 10)).astype(numpy.float32)
    label = numpy.array([1, 2, 3, 12, 0, 1])
    loss, _ = sce_dask.forward(da.from_array(x, chunks=(2, 3)), label)  # lazy: nothing raised yet
    with pytest.raises(IndexError, match=r'label value 12 at position \(3,\)'):
        loss.compute(scheduler='sync')
    with cupy_sce.label_check(False):
        loss, grad = sce_dask.forward_backward(da.from_array(x, chunks=(2, 3)), label)
    loss, grad = dask.compute(loss, grad, scheduler='sync')
    assert numpy.isnan(loss[3]).all() and numpy.isnan(grad[3]).all() and numpy.isfinite(loss[[0, 1, 2, 4, 5]]).all()


def test_bad_arguments():
    x = da.zeros((4, 6), chunks=2)
    label = numpy.zeros(4, numpy.int64)
    with pytest.raises(ValueError, match='z_loss and softcap need use_softmax=True'):
        sce_dask.cross_entropy(x, label, use_softmax=False, z_loss=0.1)
    with pytest.raises(ValueError, match='weight must be a 1-D array of length K=6'):
        sce_dask.forward(x, label, weight=numpy.ones(5))
    with pytest.raises(ValueError, match='label shape'):
        sce_dask.forward(x, numpy.zeros(5, numpy.int64))
    with pytest.raises(TypeError, match='logits must be float16, bfloat16, float32 or float64'):
        sce_dask.forward(da.zeros((4, 6), chunks=2, dtype=numpy.int32), label)
    with pytest.raises(ValueError, match='loss_grad must be a scalar'):
        sce_dask.forward_backward(x, label, numpy.ones(4), reduction='mean')


def test_memory_is_bounded_by_the_chunks_not_the_problem():
    """A 64 MiB problem in 1 MiB chunks: the loss and the gradient's sum computed on the threaded
    scheduler allocate far less than the logits (no row is ever concatenated, no N x V result
    kept); the same with the classes in 16 chunks."""
    N, V = 1024, 16384
    x = da.random.default_rng(3).standard_normal((N, V), dtype=numpy.float32, chunks=(64, 4096)) * 3
    label = da.random.default_rng(4).integers(0, V, N, chunks=64)
    logits_bytes = N * V * 4
    loss, grad = sce_dask.forward_backward(x, label, reduction='mean', label_smoothing=0.1)
    with dask.config.set(scheduler='threads', num_workers=2):
        (value, grad_sum), peak = traced_peak(lambda: dask.compute(loss, grad.sum()))
    assert numpy.isfinite(value) and numpy.isfinite(grad_sum)
    assert peak < logits_bytes / 4, (peak / 2 ** 20, logits_bytes / 2 ** 20)


def test_local_cluster_with_worker_processes_gives_the_threaded_bits():
    """A real distributed.LocalCluster (two worker processes): the same bits as the threaded
    scheduler (the merge order is the graph's), and the single-array results to rounding."""
    distributed = pytest.importorskip('distributed')
    rng = numpy.random.default_rng(5)
    x = (rng.standard_normal((40, 3, 57)) * 3).astype(numpy.float32)
    label = rng.integers(0, 57, (40, 3))
    label[::7] = -100
    kw = dict(weight=(rng.integers(1, 25, 57) / 8.0).astype(numpy.float32), label_smoothing=0.1, z_loss=1e-3,
              softcap=10.0, reduction='mean')
    dx = da.from_array(x, chunks=(16, 2, 20))
    loss, grad = sce_dask.forward_backward(dx, label, **kw)
    threaded = dask.compute(loss, grad, scheduler='threads')
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster, distributed.Client(cluster) as client:
        on_cluster = client.compute([loss, grad], sync=True)
    for a, b in zip(on_cluster, threaded):
        numpy.testing.assert_array_equal(a, b)
    want_loss, want_grad = cupy_sce.forward_backward(x, label, **kw)
    numpy.testing.assert_allclose(threaded[0], want_loss, **TOL[numpy.float32])
    numpy.testing.assert_allclose(threaded[1], want_grad, **TOL[numpy.float32])


@pytest.mark.gpu
def test_cupy_chunks_on_a_gpu():
    """Dask arrays of CuPy chunks (as dask-cuda makes them), labels as NumPy or CuPy chunks."""
    from helpers import gpu_available
    if not gpu_available():
        pytest.skip('no CUDA GPU present: CuPy chunks need one')
    import cupy
    rng = numpy.random.default_rng(6)
    x = (rng.standard_normal((33, 70)) * 3).astype(numpy.float32)
    label = rng.integers(0, 70, 33)
    kw = dict(weight=(rng.integers(1, 25, 70) / 8.0).astype(numpy.float32), label_smoothing=0.1, reduction='mean')
    dx = da.from_array(cupy.asarray(x), chunks=(8, 16), asarray=False)
    loss, grad = dask.compute(*sce_dask.forward_backward(dx, label, **kw), scheduler='threads')
    assert isinstance(grad, cupy.ndarray)
    want_loss, want_grad = cupy_sce.forward_backward(x, label, **kw)
    numpy.testing.assert_allclose(cupy.asnumpy(loss), want_loss, **TOL[numpy.float32])
    numpy.testing.assert_allclose(cupy.asnumpy(grad), want_grad, **TOL[numpy.float32])


def test_edge_cases_and_the_bfloat16_rule():
    """Review findings: no rows; a class chunk of width 0; an ignored row of NaN logits under a soft
    cap (gradient 0, not NaN); unknown chunk sizes; the array API's bfloat16 rule and scalar checks."""
    import ml_dtypes
    for reduction, want in (('none', (0, 1)), ('mean', ()), ('sum', ())):
        loss, grad = dask.compute(*sce_dask.forward_backward(
            da.from_array(numpy.zeros((0, 10), numpy.float32), chunks=(2, 3)), numpy.zeros(0, int),
            reduction=reduction), scheduler='sync')
        assert loss.shape == want and grad.shape == (0, 10) and (loss.size == 0 or loss == 0)
    x = numpy.random.default_rng(7).standard_normal((4, 6)).astype(numpy.float32)
    label = numpy.array([0, 1, 2, 3])
    grad = sce_dask.forward_backward(da.from_array(x, chunks=((2, 2), (3, 0, 3))), label)[1].compute(scheduler='sync')
    numpy.testing.assert_allclose(grad, cupy_sce.forward_backward(x, label)[1], **TOL[numpy.float32])
    nan_row = numpy.array([[numpy.nan, 1.0, 2.0], [0.0, 1.0, 2.0]])
    grad = sce_dask.forward_backward(da.from_array(nan_row, chunks=(1, 2)), numpy.array([-100, 0]), softcap=5.0)[1]
    numpy.testing.assert_array_equal(grad.compute(scheduler='sync')[0], 0)
    dx = da.from_array(x, chunks=(2, 3))
    with pytest.raises(ValueError, match='unknown chunk sizes'):
        sce_dask.forward(dx[dx[:, 0] > 0], label)
    bx = da.from_array(x.astype(ml_dtypes.bfloat16), chunks=(2, 3))
    for message, call in (
            ('logits is bfloat16 but weight is float64', lambda: sce_dask.forward(bx, label, weight=numpy.ones(6))),
            ('logits is bfloat16 but loss_grad is float64',
             lambda: sce_dask.forward_backward(bx, label, numpy.ones((4, 1)))),
            ('logits is bfloat16 but lse is float64', lambda: sce_dask.backward(None, bx, numpy.zeros(4), label)),
            ('loss_grad must be a real number, got dtype bool',
             lambda: sce_dask.forward_backward(dx, label, True, reduction='mean'))):
        with pytest.raises(TypeError, match=message):
            call()
