"""Fused linear + cross entropy (cupy_sce.linear) against the unfused composition, on every backend."""
import numpy
import pytest

import cupy_sce
from cupy_sce import linear
from helpers import HALF_DTYPES, finfo, make_weight

REDUCTIONS = ('none', 'mean', 'sum')


def make(rng, batch, H, V, dtype=numpy.float64, ignore_fraction=0.2, ignore_index=-100, bias=True):
    hidden = (rng.standard_normal(batch + (H,)) * 0.5).astype(dtype)
    weight = (rng.standard_normal((V, H)) / numpy.sqrt(H) * 2).astype(dtype)
    label = rng.integers(0, V, batch)
    label[rng.random(batch) < ignore_fraction] = ignore_index
    b = (rng.standard_normal(V) * 0.1).astype(dtype) if bias else None
    return hidden, weight, label, b


def unfused(hidden, weight, label, bias, loss_grad, reduction, kw):
    """hidden @ weight.T (+ bias), then cupy_sce.forward_backward; the gradients by the chain rule,
    all in float64."""
    h = hidden.astype(numpy.float64).reshape(-1, hidden.shape[-1])
    w = weight.astype(numpy.float64)
    logits = h @ w.T + (0 if bias is None else bias.astype(numpy.float64))
    lg = loss_grad if reduction != 'none' or loss_grad is None else loss_grad.reshape(-1)
    loss, dlogits = cupy_sce.forward_backward(logits, label.reshape(-1), lg, reduction=reduction, **kw)
    return (loss.reshape(label.shape) if reduction == 'none' else loss, (dlogits @ w).reshape(hidden.shape),
            dlogits.T @ h, None if bias is None else dlogits.sum(0))


CASES = [((12,), 8, 11, 5), ((3, 7), 6, 17, 4), ((5,), 4, 9, 64), ((1,), 3, 5, 2), ((0,), 3, 5, 2)]


@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('batch,H,V,chunk', CASES)
@pytest.mark.parametrize('bias', [False, True])
def test_matches_the_unfused_composition_float64(backend, batch, H, V, chunk, reduction, bias):
    """Chunks that do not divide N, one chunk larger than N, N = 1 and N = 0, ignored rows, every
    reduction, with and without a bias."""
    rng = numpy.random.default_rng(len(batch) * 100 + V)
    hidden, weight, label, b = make(rng, batch, H, V, bias=bias)
    g = None if reduction == 'none' else 0.7
    if reduction == 'none':
        g = rng.uniform(0.5, 1.5, batch)
    want = unfused(hidden, weight, label, b, g, reduction, {})
    got = backend(linear.linear_cross_entropy_forward_backward, hidden, weight, label, b, g, reduction=reduction,
                  chunk_size=chunk)
    for name, a, e in zip(('loss', 'grad_hidden', 'grad_weight', 'grad_bias'), got, want):
        if e is None:
            assert a is None
            continue
        assert a.shape == e.shape and a.dtype == hidden.dtype, name
        numpy.testing.assert_allclose(a, e, rtol=1e-11, atol=1e-12, err_msg=name)
    loss = backend(linear.linear_cross_entropy, hidden, weight, label, b, reduction=reduction, chunk_size=chunk)
    numpy.testing.assert_array_equal(loss, got[0])


def test_family_options_and_float32(backend):
    rng = numpy.random.default_rng(5)
    hidden, weight, label, b = make(rng, (40,), 16, 300, numpy.float32)
    kw = dict(class_weight=make_weight(rng, 300), label_smoothing=0.1, z_loss=1e-3, softcap=8.0)
    got = backend(linear.linear_cross_entropy_forward_backward, hidden, weight, label, b, reduction='mean',
                  chunk_size=7, **kw)
    want = unfused(hidden, weight, label, b, None, 'mean',
                   dict(weight=kw['class_weight'].astype(numpy.float64), label_smoothing=0.1, z_loss=1e-3,
                        softcap=8.0))
    for a, e in zip(got, want):
        numpy.testing.assert_allclose(a, e, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize('dtype', HALF_DTYPES)
def test_16_bit_accumulates_in_float32(backend, dtype):
    """grad_weight over many chunks: accumulated in float32 and rounded once, it stays within a
    16-bit rounding of the float64 composition (a 16-bit running sum would drift)."""
    rng = numpy.random.default_rng(6)
    hidden, weight, label, b = make(rng, (512,), 8, 50, dtype, ignore_fraction=0)
    got = backend(linear.linear_cross_entropy_forward_backward, hidden, weight, label, b, reduction='sum',
                  chunk_size=4)
    want = unfused(hidden, weight, label, b, None, 'sum', {})
    tol = 4 * float(finfo(dtype).eps)
    for name, a, e in zip(('loss', 'grad_hidden', 'grad_weight', 'grad_bias'), got, want):
        assert a.dtype == dtype, name
        numpy.testing.assert_allclose(a.astype(numpy.float64), e, rtol=tol, atol=tol, err_msg=name)


def test_results_do_not_depend_on_the_thread_count(numpy_backend):
    rng = numpy.random.default_rng(7)
    hidden, weight, label, b = make(rng, (64,), 16, 700, numpy.float32)
    previous = cupy_sce.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            cupy_sce.set_num_threads(threads)
            results.append(linear.linear_cross_entropy_forward_backward(hidden, weight, label, b, chunk_size=9))
    finally:
        cupy_sce.set_num_threads(previous)
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            numpy.testing.assert_array_equal(a, e)


def test_extra_memory_is_a_chunk_not_the_logits(numpy_backend):
    import tracemalloc
    rng = numpy.random.default_rng(8)
    hidden, weight, label, _ = make(rng, (4096,), 32, 4000, numpy.float32)
    logits_bytes = 4096 * 4000 * 4
    linear.linear_cross_entropy_forward_backward(hidden, weight, label, chunk_size=256)  # scratch
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = linear.linear_cross_entropy_forward_backward(hidden, weight, label, chunk_size=256)
        extra = tracemalloc.get_traced_memory()[1] - base - sum(a.nbytes for a in out if a is not None)
    finally:
        tracemalloc.stop()
    assert extra < logits_bytes / 8, (extra, logits_bytes)


def test_default_chunk_rule():
    assert linear.default_chunk_size(8192, 32000, 4) == linear.CHUNK_BYTES // (32000 * 4)
    assert linear.default_chunk_size(10, 32000, 4) == 10
    assert linear.default_chunk_size(100000, 10 ** 7, 4) == linear.CHUNK_MIN_ROWS


def test_bad_input(backend):
    rng = numpy.random.default_rng(9)
    hidden, weight, label, b = make(rng, (6,), 4, 5, numpy.float32)
    fb = linear.linear_cross_entropy_forward_backward
    with pytest.raises(ValueError, match='weight must be'):
        backend(fb, hidden, weight[:, :3], label)
    with pytest.raises(TypeError, match='weight dtype'):
        backend(fb, hidden, weight.astype(numpy.float64), label)
    with pytest.raises(ValueError, match='bias must be'):
        backend(fb, hidden, weight, label, b[:3])
    with pytest.raises(ValueError, match='label shape'):
        backend(fb, hidden, weight, label[:3])
    with pytest.raises(ValueError, match='chunk_size'):
        backend(fb, hidden, weight, label, chunk_size=0)
    bad = label.copy()
    bad[4] = 5
    with pytest.raises(IndexError, match=r'label value 5 at position \(4,\)'):
        backend(fb, hidden, weight, bad)
    with pytest.raises(IndexError, match='label value 5'):
        backend(linear.linear_cross_entropy, hidden, weight, bad)
