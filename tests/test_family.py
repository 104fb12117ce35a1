"""The loss family (issue 10) -- weight, label_smoothing, z_loss, softcap, reductions and
``cross_entropy`` -- on every backend (see helpers.Backend), against ``reference_family``.

Written from the specification of the public API, not from the implementation:

* ``forward`` -> (loss, lse); ``backward`` from lse; ``forward_backward`` (and ``inplace=True``);
* ``cross_entropy`` (Paddle's signature plus z_loss/softcap, also ``use_softmax=False``);
* reduction 'none' / 'sum' / 'mean' (divisor D: sum of row weights, or the non-ignored rows, or
  N for soft labels; D == 0 gives loss 0 and gradient 0);
* errors: bad values name the argument and the value.
"""
import math
import re

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cupy_sce
from helpers import BFLOAT16, DTYPES, compatible_dtypes, make_case, make_weight, rows_shape
from reference import reference_family

REDUCTIONS = ('none', 'sum', 'mean')
# relative tolerance of each output dtype; the absolute one scales with the problem's magnitude
RTOL = {numpy.float16: 2e-3, BFLOAT16: 1.6e-2, numpy.float32: 2e-5, numpy.float64: 1e-10}
ATOL = {numpy.float16: 2e-3, BFLOAT16: 1.6e-2, numpy.float32: 2e-5, numpy.float64: 1e-12}
# the rounding unit of the compute dtype (float32 for 16-bit and float32 logits)
COMPUTE_EPS = {numpy.float16: 2.0 ** -23, BFLOAT16: 2.0 ** -23, numpy.float32: 2.0 ** -23,
               numpy.float64: 2.0 ** -52}

FEATURES = {
    'plain': {},
    'weight': {'weight': True},
    'smoothing': {'label_smoothing': 0.2},
    'z_loss': {'z_loss': 0.05},
    'softcap': {'softcap': 2.5},
    'weight+smoothing': {'weight': True, 'label_smoothing': 0.1},
    'z_loss+softcap': {'z_loss': 0.02, 'softcap': 4.0},
    'all': {'weight': True, 'label_smoothing': 0.15, 'z_loss': 0.03, 'softcap': 3.0},
}


# ----------------------------------------------------------------------------- cases

def feature_kwargs(rng, features, K, dtype=numpy.float32):
    """The keywords of ``features`` for logits of ``dtype`` (a weight dtype that may not go with
    them -- float16 or float64 beside bfloat16 -- becomes float32)."""
    kw = dict(features)
    if kw.pop('weight', False):
        weight_dtype = kw.pop('weight_dtype', numpy.float32)
        if weight_dtype not in compatible_dtypes(dtype):
            weight_dtype = numpy.float32
        kw['weight'] = make_weight(rng, K, weight_dtype)
    kw.pop('weight_dtype', None)
    return kw


def make_loss_grad(rng, shape, axis, dtype, reduction, kind='array'):
    """Per row (the loss shape) for 'none'; a Python float, a 0-d array or None otherwise."""
    if kind == 'none':
        return None
    if reduction == 'none':
        return rng.uniform(-2.0, 2.0, rows_shape(shape, axis)).astype(dtype)
    value = rng.uniform(0.25, 2.0)
    return numpy.asarray(value, dtype) if kind == 'array' else float(value)


# ----------------------------------------------------------------------------- tolerances

def _max_finite(a):
    a = numpy.abs(numpy.asarray(a, numpy.float64))
    a = a[numpy.isfinite(a)]
    return float(a.max()) if a.size else 0.0


def _magnitude(x, ref, use_softmax=True):
    """How large the numbers the loss is made of are: |logits|, |lse| (or |log p|)."""
    if not use_softmax:
        with numpy.errstate(divide='ignore'):
            return 1.0 + _max_finite(numpy.log(numpy.asarray(x, numpy.float64)))
    return 1.0 + max(_max_finite(x), _max_finite(ref['lse']))


def _row_target_sums(x, label, kw):
    """T per row, as in the spec (used for the error budget only)."""
    axis = kw.get('axis', -1) % x.ndim
    if kw.get('soft_label'):
        return numpy.asarray(label, numpy.float64).sum(axis, keepdims=True)
    return numpy.ones(rows_shape(x.shape, axis))


def loss_tol(x, label, kw, ref, reduction, use_softmax=True):
    """rtol of the output dtype; atol that dtype's tolerance times the size of each row's terms
    (w_row * (T * magnitude + z_loss * magnitude**2)), summed for 'sum', over D for 'mean'."""
    dt = x.dtype.type
    mag = _magnitude(x, ref, use_softmax)
    T = _row_target_sums(x, label, kw)
    budget = numpy.abs(ref['row_weight']) * (T * mag + kw.get('z_loss', 0.0) * mag ** 2)
    if reduction == 'none':
        scale = _max_finite(budget)
    else:
        scale = float(budget.sum())
        if reduction == 'mean':
            scale /= ref['normalizer'] or 1.0
    return dict(rtol=RTOL[dt], atol=ATOL[dt] * max(1.0, scale))


def grad_tol(x, label, kw, ref, loss_grad, reduction):
    """rtol of the dtype; atol relative to max|grad| plus what a rounding of lse (|lse| * eps in
    the compute dtype) does to g * w * softmax * (T + 2 z lse)."""
    dt = x.dtype.type
    mag = _magnitude(x, ref)
    T = _row_target_sums(x, label, kw)
    if reduction == 'none':
        g = numpy.ones(T.shape) if loss_grad is None else numpy.asarray(loss_grad, numpy.float64)
    else:
        g = 1.0 if loss_grad is None else float(loss_grad)
        if reduction == 'mean':
            g = g / ref['normalizer'] if ref['normalizer'] else 0.0
    lse = numpy.nan_to_num(numpy.abs(ref['lse']), posinf=0.0)
    scale = _max_finite(numpy.abs(g * ref['row_weight']) * (T + 2 * kw.get('z_loss', 0.0) * lse))
    atol = ATOL[dt] * _max_finite(ref['grad']) + 16 * COMPUTE_EPS[dt] * mag * scale
    return dict(rtol=RTOL[dt], atol=max(atol, 1e-300))


# ----------------------------------------------------------------------------- the check of all paths

def api_kwargs(soft, ignore_index, axis, kw, reduction):
    out = dict(soft_label=soft, ignore_index=ignore_index, axis=axis, reduction=reduction)
    out.update(kw)
    return out


def assert_family_paths(backend, x, label, kw, *, soft=False, ignore_index=-100, axis=-1, reduction='none',
                        loss_grad=None, check_inplace=True):
    """forward (loss, lse), backward from lse, forward_backward, forward_backward(inplace=True)
    against the reference; the inputs of the non-inplace calls are left untouched."""
    ref = reference_family(x, label, soft_label=soft, ignore_index=ignore_index, axis=axis,
                           reduction=reduction, loss_grad=loss_grad, **kw)
    akw = api_kwargs(soft, ignore_index, axis, kw, reduction)
    ltol = loss_tol(x, label, dict(kw, soft_label=soft, axis=axis), ref, reduction)
    gtol = grad_tol(x, label, dict(kw, soft_label=soft, axis=axis), ref, loss_grad, reduction)
    before = [numpy.array(v, copy=True) for v in (x, label, kw.get('weight'), loss_grad)]
    want_loss_shape = rows_shape(x.shape, axis) if reduction == 'none' else ()
    cdt = cupy_sce.compute_dtype(x.dtype)
    msg = 'reduction={} soft={} axis={} kw={}'.format(reduction, soft, axis, kw)

    loss, lse = backend(cupy_sce.forward, x, label, **akw)
    assert loss.dtype == x.dtype and loss.shape == want_loss_shape, msg
    assert lse.dtype == cdt and lse.shape == rows_shape(x.shape, axis), msg
    numpy.testing.assert_allclose(loss, ref['loss'], err_msg='forward loss ' + msg, **ltol)
    lse_dt = numpy.float64 if cdt == numpy.float64 else numpy.float32     # lse is in the compute dtype
    numpy.testing.assert_allclose(lse, ref['lse'], err_msg='forward lse ' + msg, rtol=RTOL[lse_dt],
                                  atol=ATOL[lse_dt] * _magnitude(x, ref))

    grad = backend(cupy_sce.backward, loss_grad, x, lse, label, **akw)
    assert grad.dtype == x.dtype and grad.shape == x.shape, msg
    numpy.testing.assert_allclose(grad, ref['grad'], err_msg='backward ' + msg, **gtol)

    loss_fb, grad_fb = backend(cupy_sce.forward_backward, x, label, loss_grad, **akw)
    assert loss_fb.dtype == x.dtype and loss_fb.shape == want_loss_shape, msg
    assert grad_fb.dtype == x.dtype and grad_fb.shape == x.shape, msg
    numpy.testing.assert_allclose(loss_fb, ref['loss'], err_msg='forward_backward loss ' + msg, **ltol)
    numpy.testing.assert_allclose(grad_fb, ref['grad'], err_msg='forward_backward grad ' + msg, **gtol)

    for old, new in zip(before, (x, label, kw.get('weight'), loss_grad)):
        if old.shape != () or old.dtype != object:
            numpy.testing.assert_array_equal(numpy.asarray(new), old, err_msg='input modified ' + msg)

    if check_inplace:
        logits = backend.asarray(x.copy())
        args = [backend.asarray(a) for a in (label, loss_grad)]
        bkw = {k: backend.asarray(v) for k, v in akw.items()}
        with backend.active():
            loss_ip, grad_ip = cupy_sce.forward_backward(logits, args[0], args[1], inplace=True, **bkw)
            assert grad_ip is logits, 'inplace=True must return the logits array as the gradient'
        numpy.testing.assert_allclose(backend.to_numpy(logits), ref['grad'], err_msg='inplace ' + msg, **gtol)
        numpy.testing.assert_allclose(backend.to_numpy(loss_ip), ref['loss'], err_msg='inplace loss ' + msg,
                                      **ltol)
    return ref


def assert_cross_entropy(backend, x, label, kw, *, soft=False, ignore_index=-100, axis=-1, reduction='mean',
                         use_softmax=True):
    ref = reference_family(x, label, soft_label=soft, ignore_index=ignore_index, axis=axis,
                           reduction=reduction, use_softmax=use_softmax, **kw)
    before = (x.copy(), label.copy())
    loss = backend(cupy_sce.cross_entropy, x, label, weight=kw.get('weight'), ignore_index=ignore_index,
                   reduction=reduction, soft_label=soft, axis=axis, use_softmax=use_softmax,
                   label_smoothing=kw.get('label_smoothing', 0.0), z_loss=kw.get('z_loss', 0.0),
                   softcap=kw.get('softcap'))
    if reduction != 'none':
        want_shape = ()
    elif soft:
        want_shape = rows_shape(x.shape, axis)
    else:
        want_shape = label.shape                        # with or without the size-1 class axis
    assert loss.dtype == x.dtype and loss.shape == want_shape, (loss.shape, want_shape)
    tol = loss_tol(x, label, dict(kw, soft_label=soft, axis=axis), ref, reduction, use_softmax)
    numpy.testing.assert_allclose(loss, ref['loss'].reshape(want_shape), **tol)
    numpy.testing.assert_array_equal(x, before[0])
    numpy.testing.assert_array_equal(label, before[1])
    return loss


# ----------------------------------------------------------------------------- hypothesis

@st.composite
def problems(draw, max_elements=300):
    ndim = draw(st.integers(1, 3))
    axis = draw(st.integers(-ndim, ndim - 1))
    K = draw(st.integers(1, 40))
    others = []
    for _ in range(ndim - 1):
        room = max(1, max_elements // (K * max(1, math.prod(others))))
        others.append(draw(st.integers(1, min(6, room))))
    shape = others[:]
    shape.insert(axis % ndim, K)
    return tuple(shape), axis


@st.composite
def features(draw, use_softmax=True):
    kw = {}
    if draw(st.booleans()):
        kw['weight'] = True
        kw['weight_dtype'] = draw(st.sampled_from(DTYPES))
    if draw(st.booleans()):
        kw['label_smoothing'] = draw(st.sampled_from([0.0, 0.05, 0.3, 0.9]))
    if use_softmax and draw(st.booleans()):
        kw['z_loss'] = draw(st.sampled_from([0.0, 1e-4, 0.02, 0.1]))
    if use_softmax and draw(st.booleans()):
        kw['softcap'] = draw(st.sampled_from([0.5, 2.0, 7.5, 30.0]))
    return kw


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hypothesis_all_paths(backend, data):
    shape, axis = data.draw(problems())
    dtype = data.draw(st.sampled_from(DTYPES))
    soft = data.draw(st.booleans())
    reduction = data.draw(st.sampled_from(REDUCTIONS))
    ignore_index = data.draw(st.sampled_from([-100, -1, 0, 2, 1000]))
    rng = numpy.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    # float16 logits at scale 2: a 'sum' of 300 rows stays far below float16's 65504
    x, label = make_case(rng, shape, axis, dtype=dtype, soft=soft, ignore_index=ignore_index,
                         label_dtype=data.draw(st.sampled_from([numpy.int32, numpy.int64])),
                         unnormalized=data.draw(st.booleans()), scale=2.0 if dtype == numpy.float16 else 3.0)
    kw = feature_kwargs(rng, data.draw(features()), shape[axis], dtype)
    kinds = ['none', 'array', 'float'] if reduction != 'none' else ['none', 'array']
    kind = data.draw(st.sampled_from(kinds))
    loss_grad = make_loss_grad(rng, shape, axis, dtype, reduction, kind)
    assert_family_paths(backend, x, label, kw, soft=soft, ignore_index=ignore_index, axis=axis,
                        reduction=reduction, loss_grad=loss_grad)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hypothesis_cross_entropy(backend, data):
    shape, axis = data.draw(problems())
    dtype = data.draw(st.sampled_from(DTYPES))
    soft = data.draw(st.booleans())
    use_softmax = data.draw(st.booleans())
    reduction = data.draw(st.sampled_from(REDUCTIONS))
    ignore_index = data.draw(st.sampled_from([-100, -1, 0, 3]))
    rng = numpy.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    x, label = make_case(rng, shape, axis, dtype=dtype, soft=soft, ignore_index=ignore_index,
                         squeeze_label=data.draw(st.booleans()), probabilities=not use_softmax,
                         scale=2.0 if dtype == numpy.float16 else 3.0)
    kw = feature_kwargs(rng, data.draw(features(use_softmax)), shape[axis], dtype)
    assert_cross_entropy(backend, x, label, kw, soft=soft, ignore_index=ignore_index, axis=axis,
                         reduction=reduction, use_softmax=use_softmax)


# ----------------------------------------------------------------------------- each feature

@pytest.mark.parametrize('name', list(FEATURES))
@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('soft', [False, True])
def test_each_feature_alone_and_combined(backend, name, reduction, soft):
    rng = numpy.random.default_rng(sum(map(ord, name + reduction)) + soft)
    for shape, axis, dtype in (((4, 7, 3), 1, numpy.float32), ((5, 9), -1, numpy.float64)):
        x, label = make_case(rng, shape, axis, dtype=dtype, soft=soft, unnormalized=soft)
        kw = feature_kwargs(rng, FEATURES[name], shape[axis])
        loss_grad = make_loss_grad(rng, shape, axis, dtype, reduction)
        assert_family_paths(backend, x, label, kw, soft=soft, axis=axis, reduction=reduction,
                            loss_grad=loss_grad)
        assert_family_paths(backend, x, label, kw, soft=soft, axis=axis, reduction=reduction,
                            loss_grad=None, check_inplace=False)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('reduction', REDUCTIONS)
def test_dtypes_with_all_features(backend, dtype, reduction):
    rng = numpy.random.default_rng(list(DTYPES).index(dtype) * 3 + REDUCTIONS.index(reduction))
    x, label = make_case(rng, (6, 31), -1, dtype=dtype, ignore_index=5)
    for weight_dtype in compatible_dtypes(dtype):
        kw = feature_kwargs(rng, dict(FEATURES['all'], weight_dtype=weight_dtype), 31, dtype)
        loss_grad = make_loss_grad(rng, x.shape, -1, dtype, reduction)
        assert_family_paths(backend, x, label, kw, ignore_index=5, reduction=reduction, loss_grad=loss_grad)


def test_features_change_the_result(backend):
    """Each feature is really applied (guards against a keyword that is accepted and ignored)."""
    rng = numpy.random.default_rng(40)
    x, label = make_case(rng, (5, 8), -1, ignore_fraction=0.0)
    base = backend(cupy_sce.forward_backward, x, label)
    for kw in ({'weight': make_weight(rng, 8)}, {'label_smoothing': 0.1}, {'z_loss': 0.1}, {'softcap': 2.0}):
        loss, grad = backend(cupy_sce.forward_backward, x, label, **kw)
        assert not numpy.allclose(loss, base[0]) and not numpy.allclose(grad, base[1]), kw


def test_softcap_lse_is_of_the_capped_logits(backend):
    x = numpy.array([[10.0, -10.0, 0.5, 3.0]], numpy.float64)
    _, lse = backend(cupy_sce.forward, x, numpy.array([[2]]), softcap=2.0)
    y = 2.0 * numpy.tanh(x / 2.0)
    numpy.testing.assert_allclose(lse, numpy.log(numpy.exp(y).sum(-1, keepdims=True)), rtol=1e-12)


# ----------------------------------------------------------------------------- reductions

@pytest.mark.parametrize('soft', [False, True])
@pytest.mark.parametrize('weighted', [False, True])
def test_mean_divisor(backend, soft, weighted):
    """'mean' = 'sum' / D: D the sum of the row weights, or the non-ignored rows, or N (soft)."""
    rng = numpy.random.default_rng(41 + 2 * soft + weighted)
    x, label = make_case(rng, (3, 6, 4), 1, dtype=numpy.float64, soft=soft, ignore_fraction=0.4)
    kw = {'weight': make_weight(rng, 6, numpy.float64)} if weighted else {}
    s = backend(cupy_sce.forward, x, label, axis=1, soft_label=soft, reduction='sum', **kw)[0]
    m = backend(cupy_sce.forward, x, label, axis=1, soft_label=soft, reduction='mean', **kw)[0]
    if weighted and soft:
        D = (label * kw['weight'][None, :, None]).sum()
    elif weighted:
        valid = label != -100
        D = kw['weight'][numpy.where(valid, label, 0)][valid].sum()
    elif soft:
        D = 12
    else:
        D = (label != -100).sum()
    numpy.testing.assert_allclose(m, s / D, rtol=1e-13)
    ce = backend(cupy_sce.cross_entropy, x, label, axis=1, soft_label=soft, **kw)  # reduction='mean' default
    numpy.testing.assert_allclose(ce, m, rtol=1e-13)


@pytest.mark.parametrize('reduction', REDUCTIONS)
def test_scalar_loss_grad_forms(backend, reduction):
    """backward/forward_backward take a 0-d array, a Python float or None (= 1) with mean/sum;
    per-row arrays or None (= ones) with 'none'."""
    rng = numpy.random.default_rng(43)
    x, label = make_case(rng, (6, 5), -1, dtype=numpy.float64)
    kw = dict(reduction=reduction, weight=make_weight(rng, 5, numpy.float64), z_loss=0.01)
    _, lse = backend(cupy_sce.forward, x, label, **kw)
    if reduction == 'none':
        forms = [None, numpy.ones((6, 1))]
    else:
        forms = [None, 1.0, numpy.asarray(1.0), numpy.asarray(1.0, numpy.float32)]
    grads = [backend(cupy_sce.backward, g, x, lse, label, **kw) for g in forms]
    grads += [backend(cupy_sce.forward_backward, x, label, g, **kw)[1] for g in forms]
    want = reference_family(x, label, **kw)['grad']
    for grad in grads:
        numpy.testing.assert_allclose(grad, want, rtol=1e-10, atol=1e-12)
    if reduction != 'none':
        half = backend(cupy_sce.backward, 0.5, x, lse, label, **kw)
        numpy.testing.assert_allclose(half, 0.5 * want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('soft', [False, True])
def test_all_ignored_or_zero_weight_mean_is_zero(backend, soft):
    rng = numpy.random.default_rng(44)
    x, label = make_case(rng, (4, 5), -1, soft=soft, ignore_fraction=0.0)
    cases = []
    if not soft:
        all_ignored = numpy.full_like(label, -100)
        xn = x.copy()
        xn[0, 1] = numpy.nan
        xn[2] = numpy.inf
        cases += [(xn, all_ignored, {}), (xn, all_ignored, {'weight': make_weight(rng, 5)}),
                  (x, all_ignored, {'label_smoothing': 0.2, 'z_loss': 0.1})]
        label[:] = 3
    zero = make_weight(rng, 5)
    if soft:
        zero[:] = 0
    else:
        zero[3] = 0
    cases.append((x, label, {'weight': zero}))                  # D = 0: weights sum to 0
    for xs, lab, kw in cases:
        for g in (None, 2.0):
            loss, grad = backend(cupy_sce.forward_backward, xs, lab, g, soft_label=soft, reduction='mean',
                                 **kw)
            assert loss.shape == () and loss == 0, kw
            assert (grad == 0).all(), kw
            loss, lse = backend(cupy_sce.forward, xs, lab, soft_label=soft, reduction='mean', **kw)
            assert loss == 0
            assert (backend(cupy_sce.backward, g, xs, lse, lab, soft_label=soft, reduction='mean', **kw)
                    == 0).all()
        assert backend(cupy_sce.cross_entropy, xs, lab, soft_label=soft, **kw) == 0


@pytest.mark.parametrize('reduction', REDUCTIONS)
def test_ignored_rows_and_nan_rows_with_features(backend, reduction):
    rng = numpy.random.default_rng(45)
    x, label = make_case(rng, (6, 5), -1, ignore_fraction=0.0)
    label[[1, 3]] = -1
    x[1, 2] = numpy.nan
    x[3] = numpy.inf
    kw = dict(ignore_index=-1, weight=make_weight(rng, 5), label_smoothing=0.1, z_loss=0.01)
    loss, grad = backend(cupy_sce.forward_backward, x, label, reduction=reduction, **kw)
    assert (grad[[1, 3]] == 0).all() and numpy.isfinite(grad).all()
    ref = reference_family(x, label, reduction=reduction, **kw)
    numpy.testing.assert_allclose(loss, ref['loss'], rtol=2e-5, atol=1e-5)
    if reduction == 'none':
        assert (loss[[1, 3]] == 0).all()
    # a NaN or +inf in a non-ignored row makes its loss NaN
    x[4, 0] = numpy.nan
    x[5, 1] = numpy.inf
    loss = backend(cupy_sce.forward, x, label, reduction=reduction, **kw)[0]
    if reduction == 'none':
        assert numpy.isnan(loss[[4, 5], 0]).all() and numpy.isfinite(loss[[0, 1, 2, 3], 0]).all()
    else:
        assert numpy.isnan(loss)
    # with a softcap +inf is capped to c: that row is finite again
    loss = backend(cupy_sce.forward, x, label, reduction='none', softcap=5.0, **kw)[0]
    assert numpy.isnan(loss[4, 0]) and numpy.isfinite(loss[5, 0])


def test_zero_target_at_minus_inf(backend):
    x = numpy.array([[0.0, -numpy.inf, 1.0], [2.0, -numpy.inf, 1.0]], numpy.float32)
    soft = numpy.array([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]], numpy.float32)
    for kw in ({}, {'z_loss': 0.1}, {'weight': numpy.array([1.0, 2.0, 0.5], numpy.float32)}):
        ref = reference_family(x, soft, soft_label=True, **kw)
        loss, grad = backend(cupy_sce.forward_backward, x, soft, soft_label=True, **kw)
        numpy.testing.assert_allclose(loss, ref['loss'], rtol=2e-5)
        numpy.testing.assert_allclose(grad, ref['grad'], rtol=2e-5, atol=1e-6)
        assert grad[0, 1] == 0


# ----------------------------------------------------------------------------- cross_entropy

@pytest.mark.parametrize('shape,axis', [((4, 6), -1), ((3, 5, 4), 1), ((5,), 0), ((6, 4), 0)])
@pytest.mark.parametrize('squeeze', [False, True])
def test_cross_entropy_none_shapes(backend, shape, axis, squeeze):
    rng = numpy.random.default_rng(50)
    x, label = make_case(rng, shape, axis, squeeze_label=squeeze)
    loss = assert_cross_entropy(backend, x, label, {'weight': make_weight(rng, shape[axis])}, axis=axis,
                                reduction='none')
    assert loss.shape == label.shape
    sx, slabel = make_case(rng, shape, axis, soft=True)
    loss = assert_cross_entropy(backend, sx, slabel, {'label_smoothing': 0.1}, soft=True, axis=axis,
                                reduction='none')
    assert loss.shape == rows_shape(shape, axis)
    for reduction in ('mean', 'sum'):
        for dtype in DTYPES:
            loss = assert_cross_entropy(backend, x.astype(dtype), label, {}, axis=axis, reduction=reduction)
            assert loss.shape == () and loss.dtype == dtype


@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('name', list(FEATURES))
def test_cross_entropy_equals_forward(backend, reduction, name):
    rng = numpy.random.default_rng(51 + len(name))
    x, label = make_case(rng, (5, 3, 4), 1, dtype=numpy.float64)
    kw = feature_kwargs(rng, FEATURES[name], 3)
    fwd = backend(cupy_sce.forward, x, label, axis=1, reduction=reduction, **kw)[0]
    ce = backend(cupy_sce.cross_entropy, x, label, axis=1, reduction=reduction, **kw)
    numpy.testing.assert_allclose(ce, fwd, rtol=1e-12, atol=1e-14)
    assert_cross_entropy(backend, x, label, kw, axis=1, reduction=reduction)


def test_cross_entropy_positional_arguments_follow_paddle(backend):
    """cross_entropy(input, label, weight, ignore_index, reduction, soft_label, axis, use_softmax,
    label_smoothing, name); z_loss and softcap are keyword-only, as are the family's keywords
    elsewhere."""
    rng = numpy.random.default_rng(53)
    x, label = make_case(rng, (4, 5, 3), 1, dtype=numpy.float64, ignore_index=2)
    w = make_weight(rng, 5, numpy.float64)
    got = backend(cupy_sce.cross_entropy, x, label, w, 2, 'sum', False, 1, True, 0.1)
    ref = reference_family(x, label, weight=w, ignore_index=2, reduction='sum', axis=1, label_smoothing=0.1)
    numpy.testing.assert_allclose(got, ref['loss'], rtol=1e-12)
    with pytest.raises(TypeError):
        cupy_sce.cross_entropy(x, label, w, 2, 'sum', False, 1, True, 0.1, None, 0.01)  # z_loss positional
    lab = numpy.zeros((4, 1), numpy.int64)
    xs = numpy.zeros((4, 5))
    with pytest.raises(TypeError):
        cupy_sce.forward(xs, lab, False, -100, -1, numpy.ones(5))                       # weight positional
    with pytest.raises(TypeError):
        cupy_sce.forward_backward(xs, lab, None, False, -100, -1, False, numpy.ones(5))


@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('soft', [False, True])
@pytest.mark.parametrize('dtype', DTYPES)
def test_cross_entropy_probabilities(backend, reduction, soft, dtype):
    """use_softmax=False: the input holds probabilities; loss = -w_row * sum_k t_k log p_k."""
    rng = numpy.random.default_rng(52 + soft)
    for shape, axis in (((5, 7), -1), ((3, 4, 2), 1)):
        p, label = make_case(rng, shape, axis, dtype=dtype, soft=soft, probabilities=True)
        for kw in ({}, {'weight': make_weight(rng, shape[axis])}, {'label_smoothing': 0.2},
                   {'weight': make_weight(rng, shape[axis]), 'label_smoothing': 0.05}):
            assert_cross_entropy(backend, p, label, kw, soft=soft, axis=axis, reduction=reduction,
                                 use_softmax=False)


@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('soft', [False, True])
@pytest.mark.parametrize('dtype', [numpy.float32, numpy.float64])
def test_probabilities_gradient_every_path(backend, reduction, soft, dtype):
    """use_softmax=False through forward, backward (lse unused: None), forward_backward and in
    place: the gradient w.r.t. the probabilities is -loss_grad * w_row * t_k / p_k."""
    rng = numpy.random.default_rng(61 + soft)
    for shape, axis in (((5, 7), -1), ((3, 4, 2), 1)):
        p, label = make_case(rng, shape, axis, dtype=dtype, soft=soft, probabilities=True)
        for kw in ({}, {'weight': make_weight(rng, shape[axis])}, {'label_smoothing': 0.2},
                   {'weight': make_weight(rng, shape[axis]), 'label_smoothing': 0.05}):
            loss_grad = rng.uniform(0.5, 2.0, rows_shape(shape, axis)) if reduction == 'none' else 1.5
            ref = reference_family(p, label, soft_label=soft, axis=axis, reduction=reduction, use_softmax=False,
                                   loss_grad=loss_grad, **kw)
            akw = dict(soft_label=soft, axis=axis, reduction=reduction, use_softmax=False, **kw)
            tol = dict(rtol=RTOL[dtype], atol=ATOL[dtype] * max(1.0, _max_finite(ref['grad'])))
            loss, lse = backend(cupy_sce.forward, p, label, **akw)
            assert lse is None
            numpy.testing.assert_allclose(loss, ref['loss'], rtol=RTOL[dtype], atol=ATOL[dtype])
            numpy.testing.assert_allclose(backend(cupy_sce.backward, loss_grad, p, None, label, **akw), ref['grad'],
                                          **tol)
            loss_fb, grad = backend(cupy_sce.forward_backward, p, label, loss_grad, **akw)
            numpy.testing.assert_allclose(loss_fb, ref['loss'], rtol=RTOL[dtype], atol=ATOL[dtype])
            numpy.testing.assert_allclose(grad, ref['grad'], **tol)
            work = backend.asarray(p.copy())
            with backend.active():
                cupy_sce.forward_backward(work, backend.asarray(label), backend.asarray(loss_grad), inplace=True,
                                          **{k: backend.asarray(v) for k, v in akw.items()})
            numpy.testing.assert_array_equal(backend.to_numpy(work), grad)


def test_cross_entropy_probabilities_zero_target_at_zero_probability(backend):
    p = numpy.array([[0.5, 0.0, 0.5], [0.25, 0.0, 0.75]], numpy.float32)
    soft = numpy.array([[0.5, 0.0, 0.5], [0.0, 0.5, 0.5]], numpy.float32)
    loss = backend(cupy_sce.cross_entropy, p, soft, soft_label=True, use_softmax=False, reduction='none')
    numpy.testing.assert_allclose(loss[0, 0], numpy.log(2.0), rtol=2e-6)
    assert loss[1, 0] == numpy.inf
    hard = backend(cupy_sce.cross_entropy, p, numpy.array([[0], [2]]), use_softmax=False, reduction='none')
    numpy.testing.assert_allclose(hard[:, 0], [numpy.log(2.0), -numpy.log(0.75)], rtol=2e-6)


# ----------------------------------------------------------------------------- in place, determinism

@pytest.mark.parametrize('reduction', REDUCTIONS)
def test_inplace_overwrites_and_plain_call_does_not(backend, reduction):
    rng = numpy.random.default_rng(60)
    x, label = make_case(rng, (6, 9), -1)
    kw = dict(weight=make_weight(rng, 9), label_smoothing=0.1, z_loss=0.01, softcap=5.0, reduction=reduction)
    ref = reference_family(x, label, **kw)
    xb = backend.asarray(x.copy())
    with backend.active():
        loss, grad = cupy_sce.forward_backward(xb, backend.asarray(label),
                                               **{k: backend.asarray(v) for k, v in kw.items()})
        assert grad is not xb
    numpy.testing.assert_array_equal(backend.to_numpy(xb), x)      # untouched
    with backend.active():
        loss_ip, grad_ip = cupy_sce.forward_backward(xb, backend.asarray(label), inplace=True,
                                                     **{k: backend.asarray(v) for k, v in kw.items()})
        assert grad_ip is xb
    numpy.testing.assert_allclose(backend.to_numpy(xb), backend.to_numpy(grad), rtol=1e-6,
                                  atol=1e-6 * numpy.abs(ref['grad']).max())
    numpy.testing.assert_allclose(backend.to_numpy(loss_ip), backend.to_numpy(loss), rtol=1e-6)
    numpy.testing.assert_allclose(backend.to_numpy(xb), ref['grad'], rtol=2e-5,
                                  atol=2e-5 * numpy.abs(ref['grad']).max())


def _all_outputs(backend, x, label, kw, loss_grad):
    loss, lse = backend(cupy_sce.forward, x, label, **kw)
    grad = backend(cupy_sce.backward, loss_grad, x, lse, label, **kw)
    loss_fb, grad_fb = backend(cupy_sce.forward_backward, x, label, loss_grad, **kw)
    ce = backend(cupy_sce.cross_entropy, x, label, **kw)
    return loss, lse, grad, loss_fb, grad_fb, ce


@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('soft', [False, True])
def test_same_bits_twice(backend, reduction, soft):
    rng = numpy.random.default_rng(61 + soft)
    x, label = make_case(rng, (7, 33, 5), 1, soft=soft)
    kw = dict(axis=1, soft_label=soft, reduction=reduction, weight=make_weight(rng, 33), label_smoothing=0.1,
              z_loss=0.01, softcap=10.0)
    g = make_loss_grad(rng, x.shape, 1, x.dtype, reduction)
    first = _all_outputs(backend, x, label, kw, g)
    second = _all_outputs(backend, x, label, kw, g)
    for a, b in zip(first, second):
        numpy.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('shape,axis', [((4096, 100), -1), ((4096, 40), -1), ((32, 100, 64), 1)])
@pytest.mark.parametrize('reduction', REDUCTIONS)
def test_numpy_threads_give_the_same_bits(numpy_backend, shape, axis, reduction):
    rng = numpy.random.default_rng(62)
    x, label = make_case(rng, shape, axis)
    kw = dict(axis=axis, reduction=reduction, weight=make_weight(rng, shape[axis]), label_smoothing=0.05,
              z_loss=1e-3, softcap=15.0)
    g = make_loss_grad(rng, shape, axis, x.dtype, reduction)
    try:
        cupy_sce.set_num_threads(1)
        one = _all_outputs(numpy_backend, x, label, kw, g)
        cupy_sce.set_num_threads(2)
        two = _all_outputs(numpy_backend, x, label, kw, g)
    finally:
        cupy_sce.set_num_threads(None)
    for a, b in zip(one, two):
        numpy.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- errors

def _value_in(message, value):
    """The message shows the value (as str/repr, or %g for numbers)."""
    forms = {str(value), repr(value)}
    if isinstance(value, float):
        forms.add(format(value, 'g'))
    return any(f in message for f in forms)


def _entry_points(x, lab):
    lse = numpy.zeros((x.shape[0], 1), numpy.float32)
    return {
        'cross_entropy': lambda **kw: cupy_sce.cross_entropy(x, lab, **kw),
        'forward': lambda **kw: cupy_sce.forward(x, lab, **kw),
        'backward': lambda **kw: cupy_sce.backward(None, x, lse, lab, **kw),
        'forward_backward': lambda **kw: cupy_sce.forward_backward(x, lab, **kw),
    }


BAD_VALUES = [
    ('label_smoothing', -0.1), ('label_smoothing', 1.0), ('label_smoothing', 1.5),
    ('label_smoothing', float('nan')),
    ('z_loss', -1.0), ('z_loss', -1e-9), ('z_loss', float('nan')), ('z_loss', float('inf')),
    ('softcap', 0.0), ('softcap', -2.0), ('softcap', float('nan')), ('softcap', float('inf')),
    ('reduction', 'avg'), ('reduction', 'Mean'),
]


@pytest.mark.parametrize('name,value', BAD_VALUES, ids=['{}={}'.format(n, v) for n, v in BAD_VALUES])
def test_bad_values_are_value_errors(numpy_backend, name, value):
    x = numpy.zeros((3, 4), numpy.float32)
    lab = numpy.zeros((3, 1), numpy.int64)
    for entry, call in _entry_points(x, lab).items():
        with pytest.raises(ValueError) as info:
            call(**{name: value})
        message = str(info.value)
        assert name in message, (entry, message)
        assert _value_in(message, value), (entry, message)


def test_bad_weights(numpy_backend):
    x = numpy.zeros((3, 4), numpy.float32)
    lab = numpy.zeros((3, 1), numpy.int64)
    cases = [
        (ValueError, numpy.ones(3, numpy.float32)),             # wrong length
        (ValueError, numpy.ones(5, numpy.float32)),
        (ValueError, numpy.ones((1, 4), numpy.float32)),        # wrong rank
        (ValueError, numpy.ones((), numpy.float32)),
        (TypeError, numpy.ones(4, numpy.int64)),                # not floating
        (TypeError, numpy.ones(4, numpy.int32)),
        (TypeError, numpy.ones(4, bool)),
        (TypeError, numpy.ones(4, numpy.complex64)),
    ]
    for entry, call in _entry_points(x, lab).items():
        for exc, weight in cases:
            with pytest.raises(exc, match='weight'):
                call(weight=weight)
    for weight_dtype in DTYPES:                                # every floating dtype is accepted
        for call in _entry_points(x, lab).values():
            call(weight=numpy.ones(4, weight_dtype))


def test_weight_of_another_array_type_is_a_type_error(monkeypatch):
    """A device array as weight with host logits (a stand-in for cupy.ndarray, no GPU needed)."""
    import types
    from cupy_sce import _api

    class DeviceArray:
        pass
    monkeypatch.setattr(_api, 'cupy', types.SimpleNamespace(ndarray=DeviceArray,
                                                             get_array_module=lambda *a: numpy))
    x = numpy.zeros((3, 4), numpy.float32)
    lab = numpy.zeros((3, 1), numpy.int64)
    for entry, call in _entry_points(x, lab).items():
        with pytest.raises(TypeError, match='weight'):
            call(weight=DeviceArray())


@pytest.mark.parametrize('name,value', [('z_loss', 0.1), ('softcap', 5.0)])
def test_z_loss_and_softcap_need_softmax(numpy_backend, name, value):
    p = numpy.full((3, 4), 0.25, numpy.float32)
    lab = numpy.zeros((3, 1), numpy.int64)
    with pytest.raises(ValueError, match=re.escape(name)):
        cupy_sce.cross_entropy(p, lab, use_softmax=False, **{name: value})
    # the neutral values are accepted
    cupy_sce.cross_entropy(p, lab, use_softmax=False, z_loss=0.0, softcap=None)


def test_good_boundary_values_are_accepted(numpy_backend):
    x = numpy.zeros((3, 4), numpy.float32)
    lab = numpy.zeros((3, 1), numpy.int64)
    for call in _entry_points(x, lab).values():
        call(label_smoothing=0.0)
        call(label_smoothing=0.999)
        call(z_loss=0.0)
        call(softcap=1e-3)
        for reduction in REDUCTIONS:
            call(reduction=reduction)


# ----------------------------------------------------------------------------- found in review

@pytest.mark.parametrize('base', [0.0, 1e3, 1e4])
def test_smoothing_keeps_its_digits_at_large_logits(backend, base):
    """lse - mean_k y_k is formed from deviations, not from sum_k y_k: a common offset of 1e4
    would otherwise cost 4 digits of the smoothed loss."""
    rng = numpy.random.default_rng(71)
    for K in (300, 2000):  # a thread or a warp per row on the kernels
        x = (base + rng.standard_normal((4, K))).astype(numpy.float32)
        label = rng.integers(0, K, (4, 1))
        ref = reference_family(x, label, label_smoothing=0.1)['loss']
        for fn in (cupy_sce.forward, cupy_sce.forward_backward):
            loss = backend(fn, x, label, label_smoothing=0.1)[0]
            numpy.testing.assert_allclose(loss, ref, rtol=1e-6)


def test_review_findings_on_arguments(numpy_backend):
    x = numpy.array([[0.5, 0.0, 1.0]], numpy.float32)
    label = numpy.array([1])
    with pytest.raises(ValueError, match='lse is required'):
        cupy_sce.backward(None, x, None, label)
    # finite in float64, not in the float32 the kernels compute in
    with pytest.raises(ValueError, match='softcap'):
        cupy_sce.cross_entropy(x, label, softcap=1e39)
    with pytest.raises(ValueError, match='z_loss'):
        cupy_sce.cross_entropy(x, label, z_loss=1e39)
    with pytest.raises(ValueError, match='softcap'):
        cupy_sce.cross_entropy(x, label, softcap=1e-50)  # 0 in float32
    # a bad value is reported as such, also with use_softmax=False
    with pytest.raises(TypeError, match='z_loss'):
        cupy_sce.forward(x, label, z_loss='a', use_softmax=False)
    with pytest.raises(ValueError, match='z_loss must be'):
        cupy_sce.forward(x, label, z_loss=-1.0, use_softmax=False)
    # Paddle's name= is accepted; int32 labels with an ignore_index beyond int32 work
    assert cupy_sce.cross_entropy(x, label, name='loss').shape == ()
    loss = cupy_sce.cross_entropy(x, label.astype(numpy.int32), ignore_index=2 ** 40, reduction='mean')
    numpy.testing.assert_allclose(loss, reference_family(x, label)['loss'][0, 0], rtol=1e-6)


def test_a_non_finite_weight_reaches_only_the_rows_that_touch_its_class(backend):
    """0 * NaN must not leak: a soft target that is 0 on a class ignores that class's weight."""
    import warnings
    x = numpy.array([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [0.1, 0.2, 0.3]])
    soft = numpy.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    for bad in (numpy.nan, numpy.inf):
        weight = numpy.array([1.0, 2.0, bad])
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # no RuntimeWarning either: NaN and inf are valid values
            for use_softmax in (True, False):
                probs = x if use_softmax else numpy.exp(x) / numpy.exp(x).sum(-1, keepdims=True)
                loss = backend(cupy_sce.cross_entropy, probs, soft, weight=weight, soft_label=True,
                               reduction='none', use_softmax=use_softmax)
                ref = reference_family(probs, soft, soft_label=True, weight=numpy.array([1.0, 2.0, 0.0]),
                                       use_softmax=use_softmax)['loss']
                numpy.testing.assert_allclose(loss[:2], ref[:2], rtol=1e-12)
                assert not numpy.isfinite(loss[2, 0]) or bad == numpy.inf  # the row touching the class
            _, grad = backend(cupy_sce.forward_backward, x, soft, weight=weight, soft_label=True)
            assert numpy.isfinite(grad[:2]).all()
            total = backend(cupy_sce.cross_entropy, x, soft, weight=weight, soft_label=True, reduction='mean')
            assert not numpy.isfinite(total)  # the third row's weight is not finite: so is the mean
            total = backend(cupy_sce.cross_entropy, x[:2], soft[:2], weight=weight, soft_label=True)
            assert numpy.isfinite(total)


@pytest.mark.parametrize('K', [7, 97])
def test_smoothing_keeps_batch_invariance_next_to_large_logits(backend, K):
    """The float64 sum of a row with |lse| > 64 is chosen for that row alone."""
    rng = numpy.random.default_rng(11)
    a = (rng.standard_normal((30, K)) * 5 + 20).astype(numpy.float32)
    la = rng.integers(0, K, 30)
    b = (rng.standard_normal((1, K)) * 3 + 100).astype(numpy.float32)
    alone = backend(cupy_sce.forward_backward, a, la, label_smoothing=0.1)
    mixed = backend(cupy_sce.forward_backward, numpy.concatenate([a, b]), numpy.concatenate([la, [-100]]),
                    label_smoothing=0.1)
    numpy.testing.assert_array_equal(mixed[0][:30], alone[0])
    numpy.testing.assert_array_equal(mixed[1][:30], alone[1])


def test_out_that_views_the_logits(backend):
    """out=logits[:] is in place like out=logits (bad labels rejected before anything is written);
    an out that overlaps the logits otherwise is refused."""
    rng = numpy.random.default_rng(12)
    x = rng.standard_normal((4, 3)).astype(numpy.float32)
    good, bad = numpy.array([0, 1, 2, 2]), numpy.array([0, 1, 9, 2])
    _, lse = backend(cupy_sce.forward, x, good)
    expected = backend(cupy_sce.backward, None, x, lse, good)
    work = backend.asarray(x.copy())
    with backend.active():
        lse_dev, good_dev, bad_dev = (backend.asarray(a) for a in (lse, good, bad))
        with pytest.raises(IndexError):
            cupy_sce.backward(None, work, lse_dev, bad_dev, out=work[:])
        numpy.testing.assert_array_equal(backend.to_numpy(work), x)  # untouched
        out = cupy_sce.backward(None, work, lse_dev, good_dev, out=work[:])
        with pytest.raises(ValueError, match='overlaps the logits'):
            cupy_sce.backward(None, work, lse_dev, good_dev, out=work[::-1])
    numpy.testing.assert_array_equal(backend.to_numpy(out), expected)
    numpy.testing.assert_array_equal(backend.to_numpy(work), expected)


def test_empty_and_unchecked_corner_cases(numpy_backend):
    empty = numpy.zeros((0, 0), numpy.float32)
    for kw in (dict(use_softmax=False), dict(soft_label=True, weight=numpy.zeros(0, numpy.float32))):
        label = numpy.zeros((0, 0), numpy.float32) if kw.get('soft_label') else numpy.zeros(0, numpy.int64)
        for reduction in REDUCTIONS:
            loss = cupy_sce.cross_entropy(empty, label, label_smoothing=0.1, reduction=reduction, **kw)
            assert loss.shape == ((0,) if reduction == 'none' and not kw.get('soft_label') else
                                  (0, 1) if reduction == 'none' else ())
            if reduction != 'none':
                assert loss == 0
    # an unchecked uint64 label beyond int64 is out of range like any other: its row is NaN
    x = numpy.ones((2, 3), numpy.float32)
    with cupy_sce.label_check(False):
        loss = cupy_sce.cross_entropy(x, numpy.array([0, 2 ** 63 + 5], numpy.uint64), reduction='none')
    assert numpy.isfinite(loss[0]) and numpy.isnan(loss[1])
    with pytest.raises(TypeError, match='input must be'):
        cupy_sce.cross_entropy(numpy.array([[1, 2]]), numpy.array([0]))
    with pytest.raises(TypeError, match='loss_grad must be a real number'):
        cupy_sce.forward_backward(x, numpy.array([0, 1]), 1j, reduction='mean')


@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('soft', [False, True])
def test_loss_dtype_keeps_the_digits_a_float16_loss_rounds_away(backend, reduction, soft):
    """loss_dtype=float32 returns the loss the kernels computed in float32, rounded once: within
    float32's tolerance of the float64 reference, where the float16 loss is off by up to half a
    float16 ulp (0.008 at a loss of 16).  The gradient keeps the logits' dtype, lse float32."""
    rng = numpy.random.default_rng(40)
    x, label = make_case(rng, (6, 3000), -1, dtype=numpy.float16, soft=soft, scale=4.0)
    ref = reference_family(x, label, soft_label=soft, reduction=reduction)
    for fn in (cupy_sce.forward, cupy_sce.forward_backward, cupy_sce.cross_entropy):
        kw = dict(soft_label=soft, reduction=reduction, loss_dtype=numpy.float32)
        out = backend(fn, x, label, **kw)
        loss = out if fn is cupy_sce.cross_entropy else out[0]
        assert loss.dtype == numpy.float32, fn.__name__
        numpy.testing.assert_allclose(loss, ref['loss'].reshape(loss.shape), rtol=2e-5, atol=1e-6,
                                      err_msg=fn.__name__)
        if fn is cupy_sce.forward:
            assert out[1].dtype == numpy.float32
        if fn is cupy_sce.forward_backward:
            assert out[1].dtype == numpy.float16
        default = backend(fn, x, label, soft_label=soft, reduction=reduction)
        default = default if fn is cupy_sce.cross_entropy else default[0]
        assert default.dtype == numpy.float16
        numpy.testing.assert_array_equal(default, loss.astype(numpy.float16))  # one rounding either way
    for bad in ('int32', numpy.complex64, 'nonsense', 3):
        with pytest.raises(TypeError, match='loss_dtype'):
            backend(cupy_sce.forward, x, label, soft_label=soft, loss_dtype=bad)
