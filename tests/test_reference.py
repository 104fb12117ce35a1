"""The float64 reference of the loss family (``reference_family``) checked on its own.

The tests of the public API trust ``reference_family``, so it is checked here against two things
that share none of its code: central finite differences of its own loss (the gradient), and
PyTorch's float64 ``cross_entropy`` with autograd wherever the two conventions agree (the loss and
the gradient).  Its special cases (ignored rows, zero targets at -inf, NaN/+inf rows, an empty
normalizer) are spelled out by hand.
"""
import itertools
import zlib

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers
from helpers import rows_shape
from reference import reference, reference_family

REDUCTIONS = ('none', 'sum', 'mean')


def seed_of(*parts):
    """A seed from test parameters, stable across processes (unlike hash() of strings)."""
    return zlib.crc32(repr(parts).encode())


def make_case(rng, shape, axis, *, scale=2.0, ignore_fraction=0.25, **kw):
    """float64 logits (or probabilities) and a label for a (shape, axis) problem."""
    return helpers.make_case(rng, shape, axis, dtype=numpy.float64, scale=scale,
                             ignore_fraction=ignore_fraction, **kw)


def make_loss_grad(rng, shape, axis, reduction):
    if reduction == 'none':
        return rng.uniform(-2.0, 2.0, rows_shape(shape, axis))
    return float(rng.uniform(0.5, 2.0))


def objective(x, label, loss_grad, **kw):
    """The scalar whose gradient the reference's ``grad`` claims to be."""
    loss = reference_family(x, label, **kw)['loss']
    if kw.get('reduction', 'none') == 'none':
        g = numpy.ones(loss.shape) if loss_grad is None else numpy.asarray(loss_grad).reshape(loss.shape)
        return float((g * loss).sum())
    return float(loss) * (1.0 if loss_grad is None else float(loss_grad))


def finite_difference(x, label, loss_grad, *, rel_step=1e-5, **kw):
    """Central differences of ``objective``, one element at a time (float64)."""
    grad = numpy.zeros_like(x)
    probabilities = kw.get('use_softmax', True) is False
    for idx in numpy.ndindex(x.shape):
        # for probabilities the step is relative to p, so that p - h stays positive
        h = rel_step * (abs(x[idx]) if probabilities else max(1.0, abs(x[idx])))
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        grad[idx] = (objective(xp, label, loss_grad, **kw) - objective(xm, label, loss_grad, **kw)) / (2 * h)
    return grad


def assert_gradient_matches_finite_differences(x, label, loss_grad, **kw):
    got = reference_family(x, label, loss_grad=loss_grad, **kw)['grad']
    assert got.shape == x.shape and got.dtype == numpy.float64
    want = finite_difference(x, label, loss_grad, **kw)
    # atol: relative to the largest component, and at least the differences' own rounding noise
    # (about eps * |objective| / step) for components that are zero up to that noise
    noise = 1e-9 * (1.0 + abs(objective(x, label, loss_grad, **kw)))
    atol = max(1e-6 * numpy.abs(want).max(), noise)
    numpy.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=str(kw))


def make_weight(rng, K, zero_some=False):
    w = rng.uniform(0.25, 3.0, K)
    if zero_some and K > 1:
        w[rng.integers(0, K)] = 0.0
    return w


# ----------------------------------------------------------------------------- plain cases

@pytest.mark.parametrize('shape,axis', [((4, 5), -1), ((5, 4), 0), ((2, 3, 4), 1), ((6,), 0)])
@pytest.mark.parametrize('soft', [False, True])
def test_no_features_equals_the_original_reference(shape, axis, soft):
    x, label = make_case(numpy.random.default_rng(0), shape, axis, soft=soft)
    g = numpy.random.default_rng(1).uniform(-1, 1, rows_shape(shape, axis))
    loss, _, grad, lse = reference(x, label, soft, -100, axis, g)
    r = reference_family(x, label, soft_label=soft, axis=axis, loss_grad=g)
    numpy.testing.assert_allclose(r['loss'], loss, rtol=1e-14, atol=1e-15)
    numpy.testing.assert_allclose(r['grad'], grad, rtol=1e-14, atol=1e-15)
    numpy.testing.assert_allclose(r['lse'], lse, rtol=1e-14, atol=1e-15)


def test_hand_computed_values():
    x = numpy.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    label = numpy.array([[2], [0]])
    weight = numpy.array([0.5, 1.0, 2.0])
    lse0 = numpy.log(numpy.exp(1.0) + numpy.exp(2.0) + numpy.exp(3.0))
    lse1 = numpy.log(3.0)
    r = reference_family(x, label, weight=weight, z_loss=0.1)
    want = [2.0 * (lse0 - 3.0 + 0.1 * lse0 ** 2), 0.5 * (lse1 + 0.1 * lse1 ** 2)]
    numpy.testing.assert_allclose(r['loss'][:, 0], want, rtol=1e-14)
    numpy.testing.assert_allclose(r['row_weight'][:, 0], [2.0, 0.5])
    assert r['normalizer'] == 2.5
    mean = reference_family(x, label, weight=weight, z_loss=0.1, reduction='mean')['loss']
    assert mean.shape == () and numpy.isclose(mean, sum(want) / 2.5, rtol=1e-14)
    # label smoothing: t = (1 - eps) onehot + eps / K
    eps = 0.3
    r = reference_family(x[:1], label[:1], label_smoothing=eps)
    t = numpy.array([eps / 3, eps / 3, 1 - eps + eps / 3])
    numpy.testing.assert_allclose(r['loss'][0, 0], (t * (lse0 - x[0])).sum(), rtol=1e-14)
    # softcap: y = c tanh(x / c), lse of y
    r = reference_family(x[:1], label[:1], softcap=2.0)
    y = 2.0 * numpy.tanh(x[0] / 2.0)
    lse_y = numpy.log(numpy.exp(y).sum())
    numpy.testing.assert_allclose(r['lse'][0, 0], lse_y, rtol=1e-14)
    numpy.testing.assert_allclose(r['loss'][0, 0], lse_y - y[2], rtol=1e-14)
    # probabilities
    p = numpy.array([[0.2, 0.3, 0.5]])
    r = reference_family(p, numpy.array([[1]]), use_softmax=False, weight=weight)
    numpy.testing.assert_allclose(r['loss'][0, 0], -numpy.log(0.3), rtol=1e-14)
    numpy.testing.assert_allclose(r['grad'], [[0.0, -1.0 / 0.3, 0.0]], rtol=1e-14)
    assert r['lse'] is None


def test_hard_smoothing_equals_soft_smoothed_target():
    rng = numpy.random.default_rng(2)
    x, label = make_case(rng, (5, 6), -1, ignore_fraction=0.0)
    eps, weight = 0.2, make_weight(rng, 6)
    soft = (1 - eps) * (numpy.arange(6) == label).astype(float) + eps / 6
    for reduction in REDUCTIONS:
        a = reference_family(x, label, label_smoothing=eps, weight=weight, z_loss=0.05, reduction=reduction)
        b = reference_family(x, soft, soft_label=True, weight=weight, z_loss=0.05, reduction=reduction)
        for key in ('loss', 'grad', 'row_weight'):
            numpy.testing.assert_allclose(a[key], b[key], rtol=1e-13, err_msg=key)
        assert numpy.isclose(a['normalizer'], b['normalizer'], rtol=1e-14)


def test_row_weights_and_normalizers():
    rng = numpy.random.default_rng(3)
    x, label = make_case(rng, (8, 5), -1, ignore_fraction=0.0)
    label[[0, 3]] = -100
    label[1] = 2
    weight = make_weight(rng, 5)
    r = reference_family(x, label, weight=weight)
    want = numpy.where(label == -100, 0.0, weight[numpy.where(label == -100, 0, label)])
    numpy.testing.assert_array_equal(r['row_weight'], want)
    assert numpy.isclose(r['normalizer'], want.sum())
    assert reference_family(x, label)['normalizer'] == 6              # non-ignored rows
    soft_x, soft = make_case(rng, (8, 5), -1, soft=True)
    assert reference_family(soft_x, soft, soft_label=True, ignore_index=0)['normalizer'] == 8
    r = reference_family(soft_x, soft * 2, soft_label=True, weight=weight, label_smoothing=0.1)
    t = 0.9 * soft * 2 + 0.1 / 5
    numpy.testing.assert_allclose(r['row_weight'][:, 0], (t * weight).sum(-1), rtol=1e-14)
    numpy.testing.assert_allclose(r['normalizer'], (t * weight).sum(), rtol=1e-14)


def test_mean_and_sum_are_reductions_of_none():
    rng = numpy.random.default_rng(4)
    for soft, weight in itertools.product([False, True], [None, make_weight(rng, 7)]):
        x, label = make_case(rng, (3, 7, 2), 1, soft=soft)
        kw = dict(soft_label=soft, axis=1, weight=weight, label_smoothing=0.1, z_loss=0.01, softcap=4.0)
        none = reference_family(x, label, **kw)
        s = reference_family(x, label, reduction='sum', **kw)
        m = reference_family(x, label, reduction='mean', **kw)
        assert s['loss'].shape == () and m['loss'].shape == ()
        numpy.testing.assert_allclose(s['loss'], none['loss'].sum(), rtol=1e-14)
        numpy.testing.assert_allclose(m['loss'], none['loss'].sum() / none['normalizer'], rtol=1e-14)
        numpy.testing.assert_allclose(s['grad'], none['grad'], rtol=1e-14)
        numpy.testing.assert_allclose(m['grad'] * none['normalizer'], none['grad'], rtol=1e-13)
        numpy.testing.assert_array_equal(m['lse'], none['lse'])


# ----------------------------------------------------------------------------- special cases

@pytest.mark.parametrize('reduction', REDUCTIONS)
def test_ignored_rows_are_zero_even_with_nan_and_inf(reduction):
    rng = numpy.random.default_rng(5)
    x, label = make_case(rng, (5, 4), -1, ignore_fraction=0.0)
    label[[1, 3]] = -1
    x[1, 0] = numpy.nan
    x[3, :] = numpy.inf
    weight = make_weight(rng, 4)
    r = reference_family(x, label, ignore_index=-1, weight=weight, label_smoothing=0.2, z_loss=0.1,
                         reduction=reduction)
    assert (r['grad'][[1, 3]] == 0).all() and numpy.isfinite(r['grad']).all()
    assert (r['row_weight'][[1, 3]] == 0).all()
    assert numpy.isfinite(r['loss']).all()
    if reduction == 'none':
        assert (r['loss'][[1, 3]] == 0).all()


@pytest.mark.parametrize('reduction', REDUCTIONS)
def test_all_ignored_or_zero_weights(reduction):
    rng = numpy.random.default_rng(6)
    x, label = make_case(rng, (4, 3), -1)
    label[:] = -100
    x[0, 0] = numpy.nan
    for kw in ({}, {'weight': make_weight(rng, 3)}):
        r = reference_family(x, label, reduction=reduction, loss_grad=None, **kw)
        assert r['normalizer'] == 0
        assert (r['loss'] == 0).all() and (r['grad'] == 0).all()
    # non-ignored rows whose weights are all zero: D == 0, 'mean' gives 0 and gradient 0
    label[:] = 1
    weight = numpy.array([1.0, 0.0, 2.0])
    r = reference_family(x[1:], label[1:], weight=weight, reduction=reduction)
    assert r['normalizer'] == 0 and (r['loss'] == 0).all() and (r['grad'] == 0).all()


def test_zero_target_at_minus_inf_contributes_zero():
    x = numpy.array([[0.0, -numpy.inf, 1.0], [0.0, -numpy.inf, 1.0]])
    soft = numpy.array([[0.5, 0.0, 0.5], [0.5, 0.25, 0.25]])
    r = reference_family(x, soft, soft_label=True, z_loss=0.1)
    lse = numpy.log(1 + numpy.e)
    numpy.testing.assert_allclose(r['loss'][0, 0], 0.5 * lse + 0.5 * (lse - 1) + 0.1 * lse ** 2, rtol=1e-14)
    assert r['loss'][1, 0] == numpy.inf
    assert numpy.isfinite(r['grad']).all() and r['grad'][0, 1] == 0
    hard = reference_family(x, numpy.array([[2], [1]]))
    assert numpy.isfinite(hard['loss'][0, 0]) and hard['loss'][1, 0] == numpy.inf
    assert numpy.isfinite(hard['grad']).all()
    # smoothing gives every class a positive target: -inf logits make the loss +inf
    assert reference_family(x, numpy.array([[2], [0]]), label_smoothing=0.1)['loss'][0, 0] == numpy.inf


@pytest.mark.parametrize('bad', [numpy.nan, numpy.inf])
def test_nan_or_plus_inf_row_is_nan(bad):
    x = numpy.zeros((3, 4))
    x[1, 2] = bad
    label = numpy.array([[0], [0], [3]])
    for kw in ({}, {'weight': numpy.ones(4), 'label_smoothing': 0.1, 'z_loss': 0.1}):
        r = reference_family(x, label, **kw)
        assert numpy.isnan(r['loss'][1, 0]) and numpy.isfinite(r['loss'][[0, 2], 0]).all()
        assert numpy.isnan(r['lse'][1, 0]) and numpy.isnan(r['grad'][1]).all()
        assert numpy.isfinite(r['grad'][[0, 2]]).all()
        for reduction in ('sum', 'mean'):
            r = reference_family(x, label, reduction=reduction, **kw)
            assert numpy.isnan(r['loss'])
            assert numpy.isfinite(r['grad'][[0, 2]]).all()
    r = reference_family(x, label, softcap=3.0)
    if bad == numpy.inf:                                  # +inf is capped to 3: a finite row
        assert numpy.isfinite(r['loss']).all() and numpy.isfinite(r['grad']).all()
        assert r['grad'][1, 2] == 0                       # d(c tanh(x / c))/dx = 0 at +inf
        numpy.testing.assert_allclose(r['lse'][1, 0], numpy.log(3 + numpy.exp(3.0)), rtol=1e-14)
    else:
        assert numpy.isnan(r['loss'][1, 0]) and numpy.isfinite(r['loss'][[0, 2], 0]).all()


def test_label_with_and_without_class_axis():
    rng = numpy.random.default_rng(7)
    x, label = make_case(rng, (3, 5, 4), 1)
    w = make_weight(rng, 5)
    a = reference_family(x, label, axis=1, weight=w)
    b = reference_family(x, numpy.squeeze(label, 1), axis=1, weight=w)
    for key in ('loss', 'grad', 'lse', 'row_weight'):
        numpy.testing.assert_array_equal(a[key], b[key])
    assert a['loss'].shape == (3, 1, 4)


# ----------------------------------------------------------------------------- finite differences

FEATURES = {
    'plain': {},
    'weight': {'weight': True},
    'smoothing': {'label_smoothing': 0.15},
    'z_loss': {'z_loss': 0.05},
    'softcap': {'softcap': 2.5},
    'weight+smoothing': {'weight': True, 'label_smoothing': 0.3},
    'all': {'weight': True, 'label_smoothing': 0.1, 'z_loss': 0.02, 'softcap': 3.0},
}


def _resolve(features, rng, K):
    kw = dict(features)
    if kw.pop('weight', False):
        kw['weight'] = make_weight(rng, K, zero_some=True)
    return kw


@pytest.mark.parametrize('name', sorted(FEATURES))
@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('soft', [False, True])
@pytest.mark.parametrize('shape,axis', [((3, 5), -1), ((4, 3, 2), 1)])
def test_gradient_finite_differences(name, reduction, soft, shape, axis):
    rng = numpy.random.default_rng(seed_of((name, reduction, soft, axis)))
    x, label = make_case(rng, shape, axis, soft=soft)
    kw = _resolve(FEATURES[name], rng, shape[axis])
    kw.update(soft_label=soft, axis=axis, reduction=reduction)
    assert_gradient_matches_finite_differences(x, label, make_loss_grad(rng, shape, axis, reduction), **kw)
    assert_gradient_matches_finite_differences(x, label, None, **kw)


@pytest.mark.parametrize('weighted', [False, True])
@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('soft', [False, True])
@pytest.mark.parametrize('shape,axis', [((3, 5), -1), ((2, 4, 3), 1), ((4, 3), 0)])
def test_probabilities_gradient_finite_differences(weighted, reduction, soft, shape, axis):
    rng = numpy.random.default_rng(seed_of((weighted, reduction, soft, axis)))
    p, label = make_case(rng, shape, axis, soft=soft, probabilities=True)
    kw = dict(soft_label=soft, axis=axis, reduction=reduction, use_softmax=False, label_smoothing=0.1)
    if weighted:
        kw['weight'] = make_weight(rng, shape[axis])
    assert_gradient_matches_finite_differences(p, label, make_loss_grad(rng, shape, axis, reduction), **kw)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hypothesis_gradient_finite_differences(data):
    ndim = data.draw(st.integers(1, 3))
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axis = data.draw(st.integers(-ndim, ndim - 1))
    soft = data.draw(st.booleans())
    use_softmax = data.draw(st.booleans())
    reduction = data.draw(st.sampled_from(REDUCTIONS))
    rng = numpy.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    x, label = make_case(rng, shape, axis, soft=soft, probabilities=not use_softmax,
                         ignore_index=data.draw(st.sampled_from([-100, 0, 1])),
                         squeeze_label=data.draw(st.booleans()))
    kw = dict(soft_label=soft, axis=axis, reduction=reduction, use_softmax=use_softmax)
    if data.draw(st.booleans()):
        kw['weight'] = make_weight(rng, shape[axis], zero_some=data.draw(st.booleans()))
    if data.draw(st.booleans()):
        kw['label_smoothing'] = data.draw(st.floats(0.0, 0.9))
    if use_softmax and data.draw(st.booleans()):
        kw['z_loss'] = data.draw(st.floats(0.0, 0.5))
    if use_softmax and data.draw(st.booleans()):
        kw['softcap'] = data.draw(st.floats(0.5, 20.0))
    loss_grad = make_loss_grad(rng, shape, axis, reduction) if data.draw(st.booleans()) else None
    assert_gradient_matches_finite_differences(x, label, loss_grad, **kw)


# ----------------------------------------------------------------------------- PyTorch

def _torch():
    return pytest.importorskip('torch', reason='PyTorch is not installed: the comparison with '
                                               'torch.nn.functional.cross_entropy is skipped')


def torch_family(x, label, *, soft_label, ignore_index, axis, weight, label_smoothing, z_loss, softcap,
                 reduction, loss_grad, use_softmax=True):
    """Loss and gradient from PyTorch float64: F.cross_entropy (or nll_loss for probabilities),
    z-loss and softcap composed by hand, gradient by autograd."""
    torch = _torch()
    F = torch.nn.functional
    ndim = x.ndim
    axis = axis % ndim
    # torch wants the class axis at dim 1 (or dim 0 for an unbatched 1-D input)
    cdim = 0 if ndim == 1 else 1
    xt = torch.tensor(numpy.moveaxis(x, axis, cdim).copy(), dtype=torch.float64, requires_grad=True)
    if soft_label:
        target = torch.tensor(numpy.moveaxis(label, axis, cdim).copy(), dtype=torch.float64)
    else:
        lab = numpy.asarray(label)
        if lab.ndim == ndim:
            lab = numpy.squeeze(lab, axis)
        target = torch.tensor(lab, dtype=torch.int64)
    wt = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    y = xt if softcap is None else softcap * torch.tanh(xt / softcap)
    if use_softmax:
        ii = -100 if soft_label else ignore_index      # torch refuses ignore_index with soft targets
        ce = lambda red: F.cross_entropy(y, target, weight=wt, ignore_index=ii,  # NOQA
                                         reduction=red, label_smoothing=label_smoothing)
    else:
        assert not soft_label and label_smoothing == 0
        ce = lambda red: F.nll_loss(torch.log(y), target, weight=wt,  # NOQA
                                    ignore_index=ignore_index, reduction=red)
    # the per-row weight of the z-loss term (hard labels: weight[l], 0 when ignored)
    if soft_label:
        w_row = torch.ones(y.sum(cdim).shape, dtype=torch.float64)
        assert wt is None
    else:
        valid = target != ignore_index
        w_row = valid.to(torch.float64)
        if wt is not None:
            zero = torch.zeros((), dtype=torch.float64)
            w_row = torch.where(valid, wt[torch.where(valid, target, 0)], zero)
    lse = torch.logsumexp(y, dim=cdim)
    z_rows = z_loss * w_row * lse ** 2
    if reduction == 'none':
        loss = ce('none') + z_rows
        g = torch.ones_like(loss) if loss_grad is None else \
            torch.tensor(numpy.asarray(loss_grad).reshape(loss.shape), dtype=torch.float64)
    else:
        loss = ce(reduction) + (z_rows.sum() if reduction == 'sum' else z_rows.sum() / w_row.sum())
        g = torch.tensor(1.0 if loss_grad is None else float(loss_grad), dtype=torch.float64)
    loss.backward(g)
    loss_np = loss.detach().numpy()
    if reduction == 'none':
        loss_np = numpy.expand_dims(loss_np, axis)
    return loss_np, numpy.moveaxis(xt.grad.numpy(), cdim, axis)


def assert_matches_torch(x, label, **kw):
    full = dict(soft_label=False, ignore_index=-100, axis=-1, weight=None, label_smoothing=0.0,
                z_loss=0.0, softcap=None, reduction='none', loss_grad=None)
    full.update(kw)
    want_loss, want_grad = torch_family(x, label, **full)
    r = reference_family(x, label, **full)
    assert r['loss'].shape == want_loss.shape
    numpy.testing.assert_allclose(r['loss'], want_loss, rtol=1e-12, atol=1e-13, err_msg=str(kw))
    numpy.testing.assert_allclose(r['grad'], want_grad, rtol=1e-11,
                                  atol=1e-13 * max(1.0, numpy.abs(want_grad).max()), err_msg=str(kw))


TORCH_SHAPES = [((6, 5), -1), ((5, 4), 0), ((2, 4, 3), 1), ((2, 3, 2, 4), 3), ((7,), 0)]


@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('shape,axis', TORCH_SHAPES)
@pytest.mark.parametrize('features', ['plain', 'weight', 'smoothing', 'z_loss', 'softcap', 'weight+z+cap',
                                      'smoothing+z+cap'])
def test_hard_labels_against_torch(reduction, shape, axis, features):
    _torch()
    rng = numpy.random.default_rng(seed_of((reduction, shape, features)))
    ignore_index = 1 if features == 'weight' else -100
    x, label = make_case(rng, shape, axis, ignore_index=ignore_index,
                         ignore_fraction=0.0 if len(shape) == 1 else 0.25)
    if (numpy.asarray(label) == ignore_index).all():
        label.flat[0] = 0 if ignore_index != 0 else 2        # torch's mean of nothing is NaN
    kw = dict(axis=axis, reduction=reduction, ignore_index=ignore_index,
              loss_grad=make_loss_grad(rng, shape, axis, reduction))
    if 'weight' in features:
        kw['weight'] = make_weight(rng, shape[axis], zero_some=True)
    if 'smoothing' in features:
        kw['label_smoothing'] = 0.2
    if 'z' in features:
        kw['z_loss'] = 0.03
    if 'cap' in features:
        kw['softcap'] = 2.0
    if reduction == 'mean' and reference_family(x, label, **kw)['normalizer'] == 0:
        kw['weight'][label.flat[0]] = 1.0                    # torch's 0/0 is NaN, ours is 0
    assert_matches_torch(x, label, **kw)
    assert_matches_torch(x, label, **dict(kw, loss_grad=None))


@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('shape,axis', TORCH_SHAPES)
@pytest.mark.parametrize('features', ['plain', 'smoothing', 'z_loss+softcap', 'all'])
def test_soft_labels_against_torch(reduction, shape, axis, features):
    _torch()
    rng = numpy.random.default_rng(seed_of((reduction, shape, features, 'soft')))
    x, label = make_case(rng, shape, axis, soft=True)
    label *= rng.uniform(0.5, 2.0, rows_shape(shape, axis))      # rows need not sum to 1
    kw = dict(soft_label=True, axis=axis, reduction=reduction,
              loss_grad=make_loss_grad(rng, shape, axis, reduction))
    if features in ('smoothing', 'all'):
        kw['label_smoothing'] = 0.25
    if features in ('z_loss+softcap', 'all'):
        kw.update(z_loss=0.05, softcap=1.5)
    assert_matches_torch(x, label, **kw)


@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('weighted', [False, True])
@pytest.mark.parametrize('shape,axis', TORCH_SHAPES[:3])
def test_probabilities_against_torch_nll_loss(reduction, weighted, shape, axis):
    _torch()
    rng = numpy.random.default_rng(seed_of((reduction, weighted, shape)))
    p, label = make_case(rng, shape, axis, probabilities=True)
    if (label == -100).all():
        label.flat[0] = 0
    kw = dict(axis=axis, reduction=reduction, use_softmax=False,
              loss_grad=make_loss_grad(rng, shape, axis, reduction))
    if weighted:
        kw['weight'] = make_weight(rng, shape[axis])
    assert_matches_torch(p, label, **kw)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hypothesis_against_torch(data):
    _torch()
    ndim = data.draw(st.integers(1, 4))
    shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axis = data.draw(st.integers(-ndim, ndim - 1))
    soft = data.draw(st.booleans())
    reduction = data.draw(st.sampled_from(REDUCTIONS))
    rng = numpy.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    ignore_index = data.draw(st.sampled_from([-100, 0, 2]))
    x, label = make_case(rng, shape, axis, soft=soft, ignore_index=ignore_index,
                         ignore_fraction=0.0 if ndim == 1 else 0.3, squeeze_label=data.draw(st.booleans()),
                         scale=data.draw(st.sampled_from([0.1, 2.0, 20.0])))
    if not soft and (label == ignore_index).all():
        label.flat[0] = (ignore_index + 1) % shape[axis] if ignore_index >= 0 else 0
        if label.flat[0] == ignore_index:
            return                                             # K == 1 and ignore_index == 0
    kw = dict(soft_label=soft, axis=axis, reduction=reduction, ignore_index=ignore_index)
    # the conventions agree on: weight without smoothing (hard labels only), smoothing without weight
    choice = data.draw(st.sampled_from(['weight', 'smoothing', 'neither']))
    if choice == 'weight' and not soft:
        kw['weight'] = make_weight(rng, shape[axis], zero_some=data.draw(st.booleans()))
        if reduction == 'mean' and reference_family(x, label, **kw)['normalizer'] == 0:
            return                                             # torch's 0/0 is NaN, ours is 0
    elif choice == 'smoothing':
        kw['label_smoothing'] = data.draw(st.floats(0.0, 0.95))
    if data.draw(st.booleans()):
        kw['z_loss'] = data.draw(st.floats(0.0, 0.2))
    if data.draw(st.booleans()):
        kw['softcap'] = data.draw(st.floats(0.5, 30.0))
    if data.draw(st.booleans()):
        kw['loss_grad'] = make_loss_grad(rng, shape, axis, reduction)
    assert_matches_torch(x, label, **kw)


def test_torch_conventions_that_differ_are_not_compared():
    """Documents why weight + smoothing and weighted soft labels are left out of the torch checks:
    PyTorch weights each class term (sum_k w_k t_k (lse - y_k)), the spec weights the row
    ((sum_k t_k w_k) * sum_k t_k (lse - y_k))."""
    torch = _torch()
    rng = numpy.random.default_rng(8)
    x, label = make_case(rng, (4, 5), -1, ignore_fraction=0.0)
    w = make_weight(rng, 5)
    ours = reference_family(x, label, weight=w, label_smoothing=0.3, reduction='sum')['loss']
    theirs = torch.nn.functional.cross_entropy(torch.tensor(x), torch.tensor(label[:, 0]),
                                               weight=torch.tensor(w), label_smoothing=0.3,
                                               reduction='sum').item()
    assert not numpy.isclose(ours, theirs)
