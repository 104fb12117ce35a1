"""The numbered semantics of the public API, on every backend (see helpers.Backend)."""
import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cupy_sce
from helpers import BFLOAT16, DTYPES, assert_all_outputs, make_case
from reference import reference


# ---------------------------------------------------------------- hard labels, shapes, axes

@pytest.mark.parametrize('shape,axis', [((1, 1), -1), ((7, 5), -1), ((7, 5), 0), ((3, 4, 5), 1),
                                        ((2, 3, 4, 5), 2), ((2, 3, 4, 5), 0), ((33,), 0),
                                        ((4, 1000), 1), ((2, 1025), -1), ((3, 4097), 1)])
def test_hard_shapes_and_axes(backend, shape, axis):
    x, label = make_case(numpy.random.default_rng(0), shape, axis)
    assert_all_outputs(backend, x, label, axis=axis)


@pytest.mark.parametrize('dtype', [numpy.float16, numpy.float32, numpy.float64])
@pytest.mark.parametrize('label_dtype', [numpy.int8, numpy.uint8, numpy.int16, numpy.int32,
                                         numpy.int64, numpy.uint32, numpy.uint64])
def test_dtypes(backend, dtype, label_dtype):
    x, label = make_case(numpy.random.default_rng(1), (6, 31), -1, dtype=dtype,
                         label_dtype=label_dtype, ignore_index=5)
    assert_all_outputs(backend, x, label, ignore_index=5)


def test_label_without_axis_dimension(backend):
    x, label = make_case(numpy.random.default_rng(2), (3, 7, 4), 1, squeeze_label=True)
    assert label.shape == (3, 4)
    assert_all_outputs(backend, x, label, axis=1)


def test_soft_labels_with_loss_grad_leave_inputs_untouched(backend):
    rng = numpy.random.default_rng(31)
    for shape, axis in (((4, 9), -1), ((3, 5, 4), 1)):
        x, label = make_case(rng, shape, axis, soft=True, dtype=numpy.float64)
        lshape = list(shape)
        lshape[axis] = 1
        g = rng.uniform(0.5, 2, lshape)
        assert_all_outputs(backend, x, label, soft=True, axis=axis, loss_grad=g)


def test_loss_grad_not_ones_and_axis_removed_shape(backend):
    rng = numpy.random.default_rng(3)
    x, label = make_case(rng, (4, 9, 3), 1)
    g = rng.uniform(-2, 2, (4, 1, 3)).astype(numpy.float32)
    assert_all_outputs(backend, x, label, axis=1, loss_grad=g)
    grad = backend(cupy_sce.forward_backward, x, label, g[:, 0, :], axis=1)[1]
    numpy.testing.assert_allclose(grad, reference(x, label, axis=1, loss_grad=g)[2], rtol=2e-5, atol=2e-6)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hypothesis_shapes_axes_labels(backend, data):
    ndim = data.draw(st.integers(1, 4))
    shape = tuple(data.draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    axis = data.draw(st.integers(-ndim, ndim - 1))
    soft = data.draw(st.booleans())
    ignore_index = data.draw(st.sampled_from([-100, -1, 0, 2, 1000]))
    seed = data.draw(st.integers(0, 2 ** 16))
    x, label = make_case(numpy.random.default_rng(seed), shape, axis, soft=soft,
                         ignore_index=ignore_index, squeeze_label=data.draw(st.booleans()))
    assert_all_outputs(backend, x, label, soft=soft, ignore_index=ignore_index, axis=axis)


# ---------------------------------------------------------------- ignore_index (point 5)

@pytest.mark.parametrize('ignore_index', [-100, 0, 3, 6])
def test_ignored_rows_are_zero_even_with_nan_and_inf(backend, ignore_index):
    rng = numpy.random.default_rng(4)
    x = rng.standard_normal((6, 7)).astype(numpy.float32)
    label = rng.integers(0, 7, (6, 1))
    label[label == ignore_index] = (ignore_index + 1) % 7 if ignore_index >= 0 else 1
    label[[1, 3]] = ignore_index
    x[1, 2] = numpy.nan
    x[3, :] = numpy.inf
    kw = dict(ignore_index=ignore_index)
    loss = backend(cupy_sce.softmax_with_cross_entropy, x, label, **kw)
    assert loss[1, 0] == 0 and loss[3, 0] == 0
    assert numpy.isfinite(numpy.delete(loss, [1, 3], 0)).all()
    _, lse = backend(cupy_sce.forward, x, label, **kw)
    for grad in (backend(cupy_sce.forward_backward, x, label, **kw)[1],
                 backend(cupy_sce.backward, None, x, lse, label, **kw)):
        assert (grad[[1, 3]] == 0).all()
        assert numpy.isfinite(numpy.delete(grad, [1, 3], 0)).all()


# ---------------------------------------------------------------- soft labels (points 6, 7)

@pytest.mark.parametrize('shape,axis', [((5, 7), -1), ((3, 6, 4), 1), ((4, 3), 0)])
def test_soft_labels(backend, shape, axis):
    x, label = make_case(numpy.random.default_rng(5), shape, axis, soft=True)
    assert_all_outputs(backend, x, label, soft=True, axis=axis)


def test_soft_labels_unnormalized_exact_gradient(backend):
    rng = numpy.random.default_rng(6)
    x = rng.standard_normal((5, 8)).astype(numpy.float64)
    label = rng.random((5, 8)) * 3  # rows sum to ~12, not 1
    assert_all_outputs(backend, x, label, soft=True)
    grad = backend(cupy_sce.forward_backward, x, label, soft_label=True)[1]
    softmax = numpy.exp(x - numpy.logaddexp.reduce(x, -1, keepdims=True))
    paddle_grad = softmax - label
    assert not numpy.allclose(grad, paddle_grad)  # the documented difference from Paddle
    numpy.testing.assert_allclose(grad, softmax * label.sum(-1, keepdims=True) - label, rtol=1e-12)


def test_soft_label_ignores_ignore_index_and_casts(backend):
    rng = numpy.random.default_rng(7)
    x, label = make_case(rng, (4, 6), -1, soft=True)
    a = backend(cupy_sce.softmax_with_cross_entropy, x, label, soft_label=True, ignore_index=0)
    b = backend(cupy_sce.softmax_with_cross_entropy, x, label.astype(numpy.float64), soft_label=True)
    c = backend(cupy_sce.softmax_with_cross_entropy, x, label.astype(numpy.float16), soft_label=True)
    numpy.testing.assert_allclose(a, b, rtol=1e-6)
    numpy.testing.assert_allclose(c, b, rtol=1e-2)


def test_soft_zero_label_at_minus_inf_logit_contributes_zero(backend):
    x = numpy.array([[0.0, -numpy.inf, 1.0]], numpy.float32)
    label = numpy.array([[0.5, 0.0, 0.5]], numpy.float32)
    loss = backend(cupy_sce.softmax_with_cross_entropy, x, label, soft_label=True)
    numpy.testing.assert_allclose(loss, reference(x, label, True)[0], rtol=1e-6)


# ---------------------------------------------------------------- stability (point 9)

@pytest.mark.parametrize('dtype', [numpy.float32, numpy.float64])
def test_large_logits_do_not_overflow(backend, dtype):
    x = numpy.array([[1e4, -1e4, 0.0, 1e4 - 1], [-1e4, -1e4 + 2, -1e4, -1e4]], dtype)
    label = numpy.array([[3], [0]])
    assert_all_outputs(backend, x, label)
    loss = backend(cupy_sce.softmax_with_cross_entropy, x, label)
    assert 1.0 < loss[0, 0] < 1.7  # not clipped, not overflowed


def test_far_below_max_is_exact_not_clipped_at_64(backend):
    x = numpy.array([[100.0, 0.0, 1.0]], numpy.float64)
    loss = backend(cupy_sce.softmax_with_cross_entropy, x, numpy.array([[1]]))
    numpy.testing.assert_allclose(loss, [[100.0]], rtol=1e-12)  # Paddle's CPU kernel gives ~64


def test_minus_inf_logit(backend):
    x = numpy.array([[0.0, -numpy.inf, 2.0], [0.0, -numpy.inf, 2.0]], numpy.float32)
    label = numpy.array([[1], [2]])
    loss, sm = backend(cupy_sce.softmax_with_cross_entropy, x, label, return_softmax=True)
    assert loss[0, 0] == numpy.inf and numpy.isfinite(loss[1, 0])
    assert sm[0, 1] == 0 and sm[1, 1] == 0
    grad = backend(cupy_sce.forward_backward, x, label)[1]
    assert numpy.isfinite(grad).all()
    # a row of -inf: lse -inf and loss NaN (README, Stability), with a hard or a soft label
    x = numpy.full((2, 3), -numpy.inf, numpy.float32)
    for label, soft in ((numpy.array([[1], [0]]), False), (numpy.full((2, 3), 1 / 3, numpy.float32), True)):
        loss, lse = backend(cupy_sce.forward, x, label, soft_label=soft)
        assert (lse == -numpy.inf).all() and numpy.isnan(loss).all(), (soft, loss, lse)


@pytest.mark.parametrize('bad', [numpy.nan, numpy.inf])
def test_nan_or_plus_inf_makes_row_nan(backend, bad):
    x = numpy.zeros((3, 5), numpy.float32)
    x[1, 3] = bad
    label = numpy.array([[0], [0], [4]])
    loss = backend(cupy_sce.softmax_with_cross_entropy, x, label)
    assert numpy.isnan(loss[1, 0]) and numpy.isfinite(loss[[0, 2], 0]).all()
    loss_fb, grad = backend(cupy_sce.forward_backward, x, label)
    assert numpy.isnan(loss_fb[1, 0]) and numpy.isnan(grad[1]).any()


def test_numeric_stable_mode_is_accepted(backend):
    x, label = make_case(numpy.random.default_rng(8), (4, 5), 0)
    a = backend(cupy_sce.softmax_with_cross_entropy, x, label, numeric_stable_mode=False, axis=0)
    b = backend(cupy_sce.softmax_with_cross_entropy, x, label, numeric_stable_mode=True, axis=0)
    numpy.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- K == 1, zero size (point 10)

def test_k_equals_one(backend):
    x = numpy.random.default_rng(9).standard_normal((5, 1)).astype(numpy.float32) * 50
    loss, sm = backend(cupy_sce.softmax_with_cross_entropy, x, numpy.zeros((5, 1), numpy.int64),
                       return_softmax=True)
    assert (loss == 0).all() and (sm == 1).all()


@pytest.mark.parametrize('shape,axis', [((0, 5), -1), ((3, 0, 2), 0), ((0, 0), 0), ((2, 0, 3), 2)])
def test_zero_size(backend, shape, axis):
    x = numpy.zeros(shape, numpy.float32)
    lshape = list(shape)
    lshape[axis] = 1
    label = numpy.zeros(lshape, numpy.int64)
    loss, sm = backend(cupy_sce.softmax_with_cross_entropy, x, label, axis=axis, return_softmax=True)
    assert loss.shape == tuple(lshape) and sm.shape == shape
    loss, grad = backend(cupy_sce.forward_backward, x, label, axis=axis)
    assert loss.shape == tuple(lshape) and grad.shape == shape


def test_zero_classes_with_rows_is_an_error(backend):
    with pytest.raises(ValueError, match='0 classes'):
        backend(cupy_sce.softmax_with_cross_entropy, numpy.zeros((3, 0), numpy.float32),
                numpy.zeros((3, 1), numpy.int64))
    with pytest.raises(ValueError, match='0 classes'):
        backend(cupy_sce.softmax_with_cross_entropy, numpy.zeros((0,), numpy.float32),
                numpy.zeros((1,), numpy.int64))


# ---------------------------------------------------------------- layouts, inputs untouched (11)

@pytest.mark.parametrize('shape, axis', [((6, 20000), -1), ((5, 300), -1), ((9, 20), -1), ((4, 40, 5), 1)])
def test_a_row_gives_the_same_bits_in_any_batch(backend, shape, axis):
    """Batch invariance: a row's loss, softmax and gradient are bit for bit those of the same row
    computed alone (K = 20000 exceeds NumPy's 8192-element einsum buffer; K = 20 is a
    transposed tile on the CPU; axis=1 keeps inner = 5, sliced along the outer axis)."""
    x, label = make_case(numpy.random.default_rng(21), shape, axis)
    soft_x, soft_label = make_case(numpy.random.default_rng(22), shape, axis, soft=True)

    def outputs(x, label, soft_label):
        loss, softmax = backend(cupy_sce.softmax_with_cross_entropy, x, label, soft_label=soft_label,
                                return_softmax=True, axis=axis)
        loss_fb, grad = backend(cupy_sce.forward_backward, x, label, soft_label=soft_label, axis=axis)
        return loss, softmax, loss_fb, grad

    for xs, labels, soft in [(x, label, False), (soft_x, soft_label, True)]:
        batch = outputs(xs, labels, soft)
        for o in range(shape[0]):
            alone = outputs(xs[o:o + 1].copy(), labels[o:o + 1].copy(), soft)
            for got, want in zip(alone, batch):
                numpy.testing.assert_array_equal(got, want[o:o + 1], err_msg='row {} soft={}'.format(o, soft))


def test_non_contiguous_fortran_and_negative_strides(backend):
    rng = numpy.random.default_rng(10)
    base, label = make_case(rng, (6, 9, 5), 1)
    expected = reference(base, label, axis=1)
    for x in (numpy.asfortranarray(base), base[::-1][::-1].copy()[:, ::-1][:, ::-1]):
        numpy.testing.assert_allclose(backend(cupy_sce.softmax_with_cross_entropy, x, label, axis=1),
                                      expected[0], rtol=2e-5, atol=2e-6)
    flipped = base[::-1]
    lab_flipped = label[::-1]
    assert flipped.strides[0] < 0
    assert_all_outputs(backend, flipped, lab_flipped, axis=1)
    wide = numpy.zeros((6, 18, 5), numpy.float32)
    wide[:, ::2] = base
    assert_all_outputs(backend, wide[:, ::2], label, axis=1)
    assert_all_outputs(backend, numpy.asfortranarray(base), numpy.asfortranarray(label), axis=1)


@pytest.mark.parametrize('contiguous', [True, False])
def test_in_place_options(backend, contiguous):
    rng = numpy.random.default_rng(11)
    x, label = make_case(rng, (5, 12), -1)
    expected_loss, _, expected_grad, _ = reference(x, label)
    logits = x.copy() if contiguous else numpy.asfortranarray(x)
    if backend.name == 'cupy':
        pytest.skip('in-place on device arrays is covered in test_cupy_backend')
    with backend.active():
        loss, grad = cupy_sce.forward_backward(logits, label, inplace=True)
        assert grad is logits
        numpy.testing.assert_allclose(logits, expected_grad, rtol=2e-5, atol=2e-6)
        numpy.testing.assert_allclose(loss, expected_loss, rtol=2e-5, atol=2e-6)
        logits = x.copy() if contiguous else numpy.asfortranarray(x)
        _, lse = cupy_sce.forward(logits, label)
        out = cupy_sce.backward(None, logits, lse, label, out=logits)
        assert out is logits
        numpy.testing.assert_allclose(logits, expected_grad, rtol=2e-5, atol=2e-6)
        buf = numpy.empty_like(x)
        assert cupy_sce.backward(None, x, lse, label, out=buf) is buf
        numpy.testing.assert_allclose(buf, expected_grad, rtol=2e-5, atol=2e-6)


def test_in_place_with_bad_label_leaves_logits_untouched(backend):
    x = numpy.random.default_rng(12).standard_normal((4, 6)).astype(numpy.float32)
    label = numpy.array([[1], [2], [6], [0]])
    logits = backend.asarray(x.copy())
    with backend.active(), pytest.raises(IndexError):
        cupy_sce.forward_backward(logits, backend.asarray(label), inplace=True)
    numpy.testing.assert_array_equal(backend.to_numpy(logits), x)


@pytest.mark.parametrize('label_dtype', [numpy.int32, numpy.int64, numpy.uint8])
@pytest.mark.parametrize('axis', [-1, 0])
def test_in_place_label_check_names_the_first_bad_row(backend, label_dtype, axis):
    """The check before an in-place call (labels only): an ignore_index outside [0, K) is not bad,
    labels past K (and below 0) are, the error names the first of them in row order, and nothing
    is written, through ``inplace=True`` and ``backward(out=logits)`` alike."""
    rng = numpy.random.default_rng(14)
    x = rng.standard_normal((5, 6)).astype(numpy.float32)
    x = x if axis == -1 else numpy.ascontiguousarray(x.T)
    label = numpy.array([1, 200, 6, 0, 7], label_dtype)  # 200: ignore_index; rows 2 and 4 bad
    label = label[:, None] if axis == -1 else label[None, :]
    logits = backend.asarray(x.copy())
    with backend.active():
        with pytest.raises(IndexError, match=r'label value 6 at position \({}\)'.format('2, 0' if axis == -1 else '0, 2')):
            cupy_sce.forward_backward(logits, backend.asarray(label), ignore_index=200, axis=axis, inplace=True)
        ok = label.copy()
        ok[ok == 6] = 200  # only row 4 (label 7) left bad
        with pytest.raises(IndexError, match='label value 7'):
            cupy_sce.forward_backward(logits, backend.asarray(ok), ignore_index=200, axis=axis, inplace=True)
        good = ok.copy()
        good[good == 7] = 3
        lse = cupy_sce.logsumexp(logits, axis=axis)
        with pytest.raises(IndexError, match='label value 7'):
            cupy_sce.backward(None, logits, lse, backend.asarray(ok), ignore_index=200, axis=axis, out=logits)
    numpy.testing.assert_array_equal(backend.to_numpy(logits), x)
    with backend.active():  # and with every label good or ignored, the call goes through
        cupy_sce.forward_backward(logits, backend.asarray(good), ignore_index=200, axis=axis, inplace=True)
    assert not numpy.array_equal(backend.to_numpy(logits), x)


# ---------------------------------------------------------------- building blocks

def test_building_blocks(backend):
    rng = numpy.random.default_rng(13)
    x, label = make_case(rng, (4, 9, 3), 1, ignore_index=-1)
    x[0, 2, 1] = numpy.nan
    m = backend(cupy_sce.row_max, x, axis=1)
    expected = numpy.max(x.astype(numpy.float64), axis=1, keepdims=True)
    numpy.testing.assert_array_equal(m, expected)
    numpy.testing.assert_allclose(backend(cupy_sce.logsumexp, x, axis=1), reference(x, label, axis=1)[3],
                                  rtol=1e-6)
    picked = backend(cupy_sce.gather_label_logit, x, label, ignore_index=-1, axis=1)
    safe = numpy.where(label == -1, 0, label)
    numpy.testing.assert_array_equal(picked, numpy.where(label == -1, 0, numpy.take_along_axis(x, safe, 1)))


# ---------------------------------------------------------------- errors (points 1-4)

def test_error_messages(numpy_backend):
    x = numpy.zeros((3, 4), numpy.float32)
    lab = numpy.zeros((3, 1), numpy.int64)
    f = cupy_sce.softmax_with_cross_entropy
    cases = [
        (TypeError, 'float16, float32 or float64, got int32', lambda: f(x.astype(numpy.int32), lab)),
        (TypeError, 'got complex64', lambda: f(x.astype(numpy.complex64), lab)),
        (ValueError, 'rank >= 1', lambda: f(numpy.float32(1.0) * numpy.ones((), numpy.float32), lab)),
        (ValueError, r'axis 2 is out of range for logits of rank 2 \(valid: \[-2, 1\]\)',
         lambda: f(x, lab, axis=2)),
        (ValueError, 'axis -3 is out of range', lambda: f(x, lab, axis=-3)),
        (TypeError, 'axis must be an int', lambda: f(x, lab, axis=1.0)),
        (ValueError, r'label shape \(3, 2\) does not match logits shape \(3, 4\)',
         lambda: f(x, numpy.zeros((3, 2), numpy.int64))),
        (TypeError, 'label must be an integer array when soft_label=False, got float32',
         lambda: f(x, lab.astype(numpy.float32))),
        (TypeError, 'must be a floating array when soft_label=True, got int64',
         lambda: f(x, x.astype(numpy.int64), soft_label=True)),
        (ValueError, 'must equal logits shape', lambda: f(x, x[:, :2], soft_label=True)),
        (TypeError, 'ignore_index must be an int', lambda: f(x, lab, ignore_index=1.5)),
        (ValueError, 'ignore_index 9223372036854775808 does not fit in int64',
         lambda: f(x, lab, ignore_index=2 ** 63)),
        (TypeError, 'soft_label must be a bool', lambda: f(x, lab, soft_label=1)),
        (TypeError, 'return_softmax must be a bool', lambda: f(x, lab, return_softmax='yes')),
        (TypeError, 'numeric_stable_mode must be a bool', lambda: f(x, lab, numeric_stable_mode=None)),
        (ValueError, 'loss_grad shape', lambda: cupy_sce.forward_backward(x, lab, numpy.ones((4,)))),
        (TypeError, 'loss_grad must be a floating', lambda: cupy_sce.forward_backward(x, lab, lab)),
        (ValueError, 'lse shape', lambda: cupy_sce.backward(None, x, numpy.ones((2, 1)), lab)),
        (ValueError, 'out must have the logits', lambda: cupy_sce.backward(
            None, x, numpy.ones((3, 1)), lab, out=numpy.empty((3, 4)))),
        (TypeError, 'softmax must be float16', lambda: cupy_sce.softmax_with_cross_entropy_grad(
            None, lab, lab)),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc, match=message):
            call()


@pytest.mark.parametrize('value,position', [(4, (1, 0)), (-1, (2, 0)), (-101, (0, 0)), (200, (2, 0))])
def test_out_of_range_labels(backend, value, position):
    x = numpy.zeros((3, 4), numpy.float32)
    label = numpy.array([[0], [3], [1]], numpy.int64)
    label[position] = value
    msg = r'label value {} at position \({}, 0\) is out of range for K=4'.format(value, position[0])
    for call in (lambda: cupy_sce.softmax_with_cross_entropy(x, label),
                 lambda: cupy_sce.forward(x, label),
                 lambda: cupy_sce.forward_backward(x, label),
                 lambda: cupy_sce.backward(None, x, numpy.zeros((3, 1), numpy.float32), label),
                 lambda: cupy_sce.softmax_with_cross_entropy_grad(None, x, label),
                 lambda: cupy_sce.gather_label_logit(x, label)):
        with pytest.raises(IndexError, match=msg):
            backend(lambda: call())


def test_out_of_range_label_position_uses_label_shape(backend):
    x = numpy.zeros((2, 5, 3), numpy.float32)
    label = numpy.zeros((2, 3), numpy.int32)
    label[1, 2] = 5
    with pytest.raises(IndexError, match=r'value 5 at position \(1, 2\) .* K=5'):
        backend(cupy_sce.softmax_with_cross_entropy, x, label, axis=1)
    label = numpy.zeros((2, 1, 3), numpy.uint8)
    label[1, 0, 0] = 255
    with pytest.raises(IndexError, match=r'value 255 at position \(1, 0, 0\)'):
        backend(cupy_sce.softmax_with_cross_entropy, x, label, axis=1)


def test_uint64_label_too_large(backend):
    """A uint64 label above int64's range is a bad label like any other: reported by the label
    check with its value and position (no extra host sync: see test_kernels' count of reads), and
    NaN without the check; it never wraps to a valid class."""
    x = numpy.zeros((3, 3), numpy.float32)
    label = numpy.array([[1], [2 ** 63 + 5], [2]], numpy.uint64)
    with pytest.raises(IndexError, match=r'9223372036854775813 at position \(1, 0\)'):
        backend(cupy_sce.softmax_with_cross_entropy, x, label)
    with cupy_sce.label_check(False):
        loss = backend(cupy_sce.softmax_with_cross_entropy, x, label)
        grad = backend(cupy_sce.forward_backward, x, label)[1]
    assert numpy.isfinite(loss[[0, 2]]).all() and numpy.isnan(loss[1, 0]) and numpy.isnan(grad[1]).all()


def test_label_check_can_be_disabled(backend):
    x = numpy.zeros((3, 4), numpy.float32)
    label = numpy.array([[0], [9], [-100]])
    with cupy_sce.label_check(False):
        loss = backend(cupy_sce.softmax_with_cross_entropy, x, label)
        _, grad = backend(cupy_sce.forward_backward, x, label)
    assert numpy.isnan(loss[1, 0]) and loss[2, 0] == 0 and numpy.isfinite(loss[0, 0])
    assert numpy.isnan(grad[1]).all() and (grad[2] == 0).all()


def test_mixing_array_types_is_a_type_error(monkeypatch):
    """The dispatch rule, without a GPU: a stand-in for cupy.ndarray among numpy arrays."""
    import types
    from cupy_sce import _api

    class DeviceArray:
        pass
    fake_cupy = types.SimpleNamespace(ndarray=DeviceArray, get_array_module=lambda *a: numpy)
    monkeypatch.setattr(_api, 'cupy', fake_cupy)
    x = numpy.zeros((2, 3), numpy.float32)
    label = numpy.zeros((2, 1), numpy.int64)
    msg = ('cannot mix numpy and cupy arrays in one call: logits is a numpy.ndarray but label is a '
           'cupy.ndarray')
    with pytest.raises(TypeError, match=msg):
        cupy_sce.softmax_with_cross_entropy(x, DeviceArray())
    with pytest.raises(TypeError, match='cannot mix numpy and cupy'):
        cupy_sce.backward(DeviceArray(), x, numpy.zeros((2, 1), numpy.float32), label)
    with pytest.raises(TypeError, match='cannot mix numpy and cupy'):
        cupy_sce.forward_backward(x, label, loss_grad=DeviceArray())


def test_bfloat16_beside_other_floats_is_an_error(backend):
    """A bfloat16 call takes its other floating arrays in bfloat16 or float32: a float16 or float64
    one would be rounded to another precision without a word.  Scalars (a number, a 0-d array) are
    values, not arrays, and pass."""
    if BFLOAT16 not in DTYPES:
        pytest.skip('this run\'s harness holds no bfloat16 kernels (CUPY_SCE_HARNESS_DTYPES)')
    rng = numpy.random.default_rng(31)
    x = rng.standard_normal((3, 4)).astype(BFLOAT16)
    lab = numpy.zeros((3, 1), numpy.int64)
    soft = numpy.full((3, 4), 0.25)
    cases = [
        ('logits is bfloat16 but label is float64', lambda: cupy_sce.forward(x, soft, soft_label=True)),
        ('logits is bfloat16 but label is float16',
         lambda: cupy_sce.forward(x, soft.astype(numpy.float16), soft_label=True)),
        ('input is bfloat16 but weight is float64', lambda: cupy_sce.cross_entropy(x, lab, numpy.ones(4))),
        ('loss_grad is bfloat16 but logits is float16',
         lambda: cupy_sce.forward_backward(x.astype(numpy.float16), lab, numpy.ones((3, 1), BFLOAT16))),
        ('logits is bfloat16 but lse is float64',
         lambda: cupy_sce.backward(None, x, numpy.zeros((3, 1)), lab)),
        ('softmax is bfloat16 but label is float16', lambda: cupy_sce.softmax_with_cross_entropy_grad(
            None, x, soft.astype(numpy.float16), soft_label=True)),
    ]
    with backend.active():
        for message, call in cases:
            with pytest.raises(TypeError, match=message):
                call()
        # bfloat16 with float32 (the compute dtype): accepted, and so are scalars
        cupy_sce.forward(x, soft.astype(numpy.float32), soft_label=True)
        cupy_sce.cross_entropy(x, lab, numpy.ones(4, numpy.float32))
        cupy_sce.forward_backward(x, lab, 2.0, reduction='mean')
        cupy_sce.forward_backward(x, lab, numpy.float64(2.0), reduction='sum')
        _, lse = cupy_sce.forward(x, lab)
        assert lse.dtype == numpy.float32
        cupy_sce.backward(numpy.ones((3, 1), BFLOAT16), x, lse, lab)
        assert cupy_sce.cross_entropy(x, lab, loss_dtype='bfloat16').dtype == BFLOAT16


def test_without_ml_dtypes_the_other_dtypes_work(tmp_path):
    """ml_dtypes is imported only when bfloat16 is met: without it, import cupy_sce and the float16/32/64
    paths work, and bfloat16 (an array made before, the string 'bfloat16') is a TypeError that says
    to install it."""
    import subprocess
    import sys
    program = '''
import sys
import ml_dtypes, numpy
made_before = numpy.zeros((2, 3), ml_dtypes.bfloat16)
for name in [m for m in sys.modules if m == 'ml_dtypes' or m.startswith('ml_dtypes.')]:
    del sys.modules[name]


class NoMlDtypes:  # import ml_dtypes now raises ImportError, as where it is not installed
    def find_spec(self, name, path=None, target=None):
        if name == 'ml_dtypes' or name.startswith('ml_dtypes.'):
            raise ImportError('No module named ' + repr(name))


sys.meta_path.insert(0, NoMlDtypes())
import cupy_sce
from cupy_sce.testing import harness
assert numpy.dtype('bfloat16') is not None  # registered with NumPy before: still known by name
assert all(numpy.dtype(d).name != 'bfloat16' for d in harness.DTYPES)
x = numpy.zeros((2, 3), numpy.float16)
label = numpy.zeros((2, 1), numpy.int64)
for dtype in (numpy.float16, numpy.float32, numpy.float64):
    cupy_sce.forward_backward(x.astype(dtype), label)
for call in (lambda: cupy_sce.forward(made_before, label),
             lambda: cupy_sce.cross_entropy(x, label, loss_dtype='bfloat16')):
    try:
        call()
    except TypeError as exc:
        assert 'pip install ml_dtypes' in str(exc), exc
    else:
        raise AssertionError('no TypeError')
print('ok')
'''
    result = subprocess.run([sys.executable, '-c', program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-3000:]


def test_array_likes_and_non_arrays(numpy_backend):
    loss = cupy_sce.softmax_with_cross_entropy([[0.0, 1.0, 2.0]], [[2]])
    numpy.testing.assert_allclose(loss, reference(numpy.array([[0.0, 1.0, 2.0]]), numpy.array([[2]]))[0])
    with pytest.raises(TypeError, match='logits must be float16, bfloat16, float32 or float64'):
        cupy_sce.softmax_with_cross_entropy([[0, 1, 2]], [[2]])
    with pytest.raises(TypeError):
        cupy_sce.softmax_with_cross_entropy(object(), [[2]])


def test_thread_settings(monkeypatch):
    x, label = make_case(numpy.random.default_rng(14), (300, 7), -1)
    expected = cupy_sce.softmax_with_cross_entropy(x, label)
    try:
        for n in (1, 3):
            cupy_sce.set_num_threads(n)
            assert cupy_sce.get_num_threads() == n
            numpy.testing.assert_array_equal(cupy_sce.softmax_with_cross_entropy(x, label), expected)
        for bad in (0, -1, 2.0, True):
            with pytest.raises(ValueError, match='num_threads must be a positive int'):
                cupy_sce.set_num_threads(bad)
        cupy_sce.set_num_threads(None)
        monkeypatch.setenv('CUPY_SCE_NUM_THREADS', 'two')
        with pytest.raises(ValueError, match="CUPY_SCE_NUM_THREADS must be a positive integer, got 'two'"):
            cupy_sce.get_num_threads()
        monkeypatch.setenv('CUPY_SCE_NUM_THREADS', '1')
        assert cupy_sce.get_num_threads() == 1
    finally:
        cupy_sce.set_num_threads(None)
