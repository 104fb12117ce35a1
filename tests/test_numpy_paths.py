"""The NumPy backend's two ways through step 2: ``exp(x)`` unshifted where a row's sum is
safe, the row max shift elsewhere (``_numpy_backend._exp_sum``), and the same split in the
backward from lse (``_exp_minus_lse``).  Both must give the reference's answer, a row's
result must not depend on the rows around it, and the cheap path must really be taken.
Every test but the one about the max pass runs on the compiled CPU kernels too
(``_cpu_kernels``: one row at a time, unshifted where the row's sum is safe), which must meet the
same bounds.
"""
import numpy
import pytest

import cupy_sce
from cupy_sce import _numpy_backend
from helpers import CPU_KERNELS, cpu_kernels
from reference import reference


@pytest.fixture(autouse=True, params=CPU_KERNELS)
def kernels(request):
    with cpu_kernels(request.param):
        yield request.param

# tighter than helpers.TOL: these rows are built to expose a lost digit (float64:
# the reference itself rounds x - lse by 800 * eps = 2e-13 at the largest offset; float16
# computes in float32 and rounds each output once, to 2**-11 relative)
TIGHT = {numpy.float16: dict(rtol=1e-3, atol=1e-7), numpy.float32: dict(rtol=2e-6, atol=1e-7),
         numpy.float64: dict(rtol=5e-13, atol=1e-15)}
# row offsets: -300 and -95 (sums underflow: shifted), -80 (shifted too, a sum of normals),
# -0.5 and 0 (unshifted), 60 and 87 (unshifted, near float32's overflow), 95 and 800
# (overflow: shifted in float32, and 800 in float64 too)
OFFSETS = [-300.0, -95.0, -80.0, -0.5, 0.0, 60.0, 87.0, 95.0, 800.0]


def _offset_rows(rng, K, dtype):
    base = rng.standard_normal((1, K)) * 2
    x = (base + numpy.array(OFFSETS)[:, None]).astype(dtype)
    label = rng.integers(0, K, (len(OFFSETS), 1))
    return x, label


def _all_outputs(x, label, **kw):
    loss, softmax = cupy_sce.softmax_with_cross_entropy(x, label, return_softmax=True, **kw)
    loss_fb, grad = cupy_sce.forward_backward(x, label, **kw)
    _, lse = cupy_sce.forward(x, label, **kw)
    grad_from_lse = cupy_sce.backward(None, x, lse, label, **kw)
    return loss, softmax, loss_fb, grad, lse, grad_from_lse


@pytest.mark.parametrize('dtype', [numpy.float16, numpy.float32, numpy.float64])
@pytest.mark.parametrize('K', [1, 7, 1000])
def test_every_offset_matches_the_reference(dtype, K):
    x, label = _offset_rows(numpy.random.default_rng(K), K, dtype)
    loss, softmax, loss_fb, grad, lse, grad_from_lse = _all_outputs(x, label)
    ref_loss, ref_softmax, ref_grad, ref_lse = reference(x, label)
    tol = TIGHT[dtype]
    # the backward is exact to the lse it is given, which float32 rounds by |lse| * eps
    given = numpy.exp(x.astype(numpy.float64) - lse.astype(numpy.float64))
    ref_grad_from_lse = given - (numpy.arange(K) == label)
    for name, got, want in [('loss', loss, ref_loss), ('softmax', softmax, ref_softmax),
                            ('loss_fb', loss_fb, ref_loss), ('grad', grad, ref_grad),
                            ('grad_from_lse', grad_from_lse, ref_grad_from_lse)]:
        numpy.testing.assert_allclose(got, want, err_msg=name, **tol)
    # lse itself is held to its own magnitude: float32 rounds 800 to 6e-5
    numpy.testing.assert_allclose(lse, ref_lse, rtol=tol['rtol'])
    if K == 1:
        assert (loss == 0).all() and (softmax == 1).all() and (grad == 0).all()


def test_one_class_is_exact():
    # unshifted, the label's own term exp(x) * exp(-x) is 1 only up to rounding: it must not
    # enter the loss (log1p of the other terms)
    x = (numpy.random.default_rng(2).standard_normal((1000, 1)) * 30).astype(numpy.float32)
    label = numpy.zeros((1000, 1), numpy.int64)
    loss, softmax, loss_fb, grad, _, grad_from_lse = _all_outputs(x, label)
    assert (loss == 0).all() and (loss_fb == 0).all() and (softmax == 1).all()
    assert (grad == 0).all() and (grad_from_lse == 0).all()


def test_small_loss_keeps_its_digits():
    # the label is the max by 10 at a large logit: loss = log(1 + 9 e^-10) = 4.1e-4.  Taken
    # as log(sum exp x) - x[label] it would be off by 50 * eps = 7e-3 of itself.
    x = numpy.full((3, 10), 40.0, numpy.float32)
    x[:, 4] = 50.0
    x[1] += 30.0
    x[2] -= 39.0
    label = numpy.full((3, 1), 4)
    loss = cupy_sce.softmax_with_cross_entropy(x, label)
    # both forms land within 1 eps (0.6 measured) of the float64 reference
    eps = numpy.finfo(numpy.float32).eps
    numpy.testing.assert_allclose(loss, reference(x, label)[0], rtol=0, atol=2 * eps)


@pytest.mark.parametrize('dtype', [numpy.float32, numpy.float64])
def test_label_far_below_lse(dtype):
    # x[label] more than EXP_HEADROOM below lse: the label shift would overflow, shift 0 instead
    x = numpy.zeros((3, 10), dtype)
    x[0, 2] = -100.0
    x[1, 2] = -1000.0
    x[2, 2] = -numpy.inf
    label = numpy.full((3, 1), 2)
    loss, _, loss_fb, grad, _, grad_from_lse = _all_outputs(x, label)
    ref_loss, _, ref_grad, _ = reference(x, label)
    assert loss[2, 0] == numpy.inf and loss_fb[2, 0] == numpy.inf
    numpy.testing.assert_allclose(loss[:2], ref_loss[:2], rtol=1e-6)
    numpy.testing.assert_allclose(grad, ref_grad, **TIGHT[dtype])
    numpy.testing.assert_allclose(grad_from_lse, ref_grad, **TIGHT[dtype])


def _count_row_max(monkeypatch):
    calls = []
    real = _numpy_backend._row_max

    def counting(x):
        calls.append(x.shape)
        return real(x)
    monkeypatch.setattr(_numpy_backend, '_row_max', counting)
    return calls


@pytest.mark.parametrize('kernels', ['numpy'], indirect=True)  # the pure-NumPy path's own shortcut
def test_typical_logits_skip_the_max_pass(monkeypatch, kernels):
    rng = numpy.random.default_rng(3)
    x = (rng.standard_normal((64, 300)) * 3).astype(numpy.float32)
    label = rng.integers(0, 300, (64, 1))
    calls = _count_row_max(monkeypatch)
    cupy_sce.softmax_with_cross_entropy(x, label, return_softmax=True)
    cupy_sce.forward_backward(x, label)
    cupy_sce.forward_backward(x.copy(), label, inplace=True)
    assert calls == []
    x[10] -= 300.0
    cupy_sce.softmax_with_cross_entropy(x, label)
    assert len(calls) == 1
    # soft labels always shift by the max
    soft = rng.random((64, 300)).astype(numpy.float32)
    cupy_sce.softmax_with_cross_entropy(x, soft, soft_label=True)
    assert len(calls) == 2


@pytest.mark.parametrize('K', [50, 100])  # transposed tiles (K <= SMALL_K) and row tiles
def test_a_row_does_not_depend_on_its_neighbours(monkeypatch, K):
    rng = numpy.random.default_rng(5)
    x = (rng.standard_normal((40, K)) * 3).astype(numpy.float32)
    label = rng.integers(0, K, (40, 1))
    monkeypatch.setattr(_numpy_backend, 'MIN_BLOCK_ELEMENTS', 10 * K)  # 10 rows a tile
    clean = _all_outputs(x, label)
    mixed = x.copy()
    mixed[7] += 200.0   # overflows: its tile is redone, shifted by the max
    mixed[23] -= 500.0  # underflows: likewise
    together = _all_outputs(mixed, label)
    others = numpy.arange(40) != 7
    others[23] = False
    for got, want in zip(together, clean):
        numpy.testing.assert_array_equal(got[others], want[others])
    ref = reference(mixed, label)
    for got, want in [(together[0], ref[0]), (together[1], ref[1]), (together[3], ref[2])]:
        numpy.testing.assert_allclose(got[~others], want[~others], **TIGHT[numpy.float32])


@pytest.mark.parametrize('axis', [0, 1])
def test_in_place_redo_still_has_the_logits(axis):
    # in place the exponentials go to scratch, so a tile that must be redone still reads x
    rng = numpy.random.default_rng(9)
    x = (rng.standard_normal((6, 20, 3)) * 2).astype(numpy.float32)
    x[2] += 150.0
    label = rng.integers(0, x.shape[axis], [1 if a == axis else n for a, n in enumerate(x.shape)])
    ref_loss, _, ref_grad, _ = reference(x, label, axis=axis)
    logits = x.copy()
    loss, grad = cupy_sce.forward_backward(logits, label, axis=axis, inplace=True)
    assert grad is logits
    numpy.testing.assert_allclose(loss, ref_loss, **TIGHT[numpy.float32])
    numpy.testing.assert_allclose(grad, ref_grad, **TIGHT[numpy.float32])


@pytest.mark.parametrize('shape', [(33, 20000), (200001, 20)])
def test_thread_count_does_not_change_the_bits(shape):
    # the tiles shrink with more threads (at least TILES_PER_THREAD each): 8 rows then a
    # 1-row tile for 33 x 20000 on one thread, 3 rows on three; every result must be the same
    rng = numpy.random.default_rng(13)
    x = (rng.standard_normal(shape) * 3).astype(numpy.float32)
    label = rng.integers(0, shape[1], (shape[0], 1))
    results = []
    try:
        for n in (1, 2, 3):
            cupy_sce.set_num_threads(n)
            results.append(_all_outputs(x, label))
    finally:
        cupy_sce.set_num_threads(None)
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            numpy.testing.assert_array_equal(got, want)
