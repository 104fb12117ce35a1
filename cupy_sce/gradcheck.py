"""Finite-difference check of the analytic gradient, for any shape, axis and backend.

``check_gradient`` compares each backward path with central differences of
``f(x) = sum(loss(x) * loss_grad)`` in float64.  ``scripts/gradcheck.py`` runs
it over a matrix of cases; users can call it for their own shapes::

    from cupy_sce.gradcheck import check_gradient
    result = check_gradient((8, 5, 3), axis=1, soft_label=True)
    assert result.passed, result
"""
import collections

import numpy

import cupy_sce

PATHS = ('softmax', 'lse', 'fused')

GradcheckResult = collections.namedtuple(
    'GradcheckResult', 'max_abs_err max_rel_err passed')


def _make_inputs(rng, shape, axis, soft_label, ignore_index, normalized):
    x = rng.standard_normal(shape) * 2.0
    K = shape[axis]
    label_shape = list(shape)
    label_shape[axis] = 1
    if soft_label:
        label = rng.random(shape)
        if normalized:
            label /= label.sum(axis=axis, keepdims=True)
        else:
            label *= 1.7  # rows sum to about 0.85 * K: the exact gradient differs from Paddle's here
    else:
        label = rng.integers(0, K, size=label_shape)
        # about a quarter of the rows are ignored (ignore_index may lie inside [0, K))
        label[rng.random(label_shape) < 0.25] = ignore_index
    loss_grad = rng.uniform(0.5, 2.0, size=label_shape)
    return x, label, loss_grad


def analytic_gradient(xp, x, label, loss_grad, soft_label, ignore_index, axis, path, family=None):
    """The gradient of ``sum(loss * loss_grad)`` by one of the backward ``PATHS``; ``family``:
    the loss-family keywords (weight, label_smoothing, z_loss, softcap, reduction)."""
    kw = dict(soft_label=soft_label, ignore_index=ignore_index, axis=axis)
    family = family or {}
    if path == 'softmax':
        if family:
            raise ValueError("path 'softmax' is Paddle's grad op: it takes no loss-family options")
        _, softmax = cupy_sce.softmax_with_cross_entropy(x, label, return_softmax=True, **kw)
        return cupy_sce.softmax_with_cross_entropy_grad(loss_grad, softmax, label, **kw)
    if path == 'lse':
        _, lse = cupy_sce.forward(x, label, **kw, **family)
        return cupy_sce.backward(loss_grad, x, lse, label, **kw, **family)
    if path == 'fused':
        return cupy_sce.forward_backward(x, label, loss_grad, **kw, **family)[1]
    raise ValueError('path must be one of {}, got {!r}'.format(PATHS, path))


def check_gradient(shape, axis=-1, soft_label=False, ignore_index=-100, path='lse', xp=numpy,
                   normalized=True, seed=0, eps=1e-6, atol=1e-6, rtol=1e-5, weight=False, label_smoothing=0.0,
                   z_loss=0.0, softcap=None, reduction='none'):
    """Compare the analytic gradient with central differences (float64).

    ``xp`` picks the backend (``numpy`` or ``cupy``).  The loss-family options are those of
    ``cupy_sce.forward`` (``weight=True``: random class weights in [0.5, 2)); with reduction
    'mean' or 'sum' the loss is a scalar and ``loss_grad`` a random scalar.  Returns a
    ``GradcheckResult(max_abs_err, max_rel_err, passed)``; an element passes when ``|analytic -
    numeric| <= atol + rtol * |numeric|``.
    """
    rng = numpy.random.default_rng(seed)
    x, label, loss_grad = _make_inputs(rng, tuple(shape), axis, soft_label, ignore_index,
                                       normalized)
    family = {}
    if weight:
        family['weight'] = xp.asarray(rng.uniform(0.5, 2.0, shape[axis]))
    for key, value, off in (('label_smoothing', label_smoothing, 0.0), ('z_loss', z_loss, 0.0),
                            ('softcap', softcap, None), ('reduction', reduction, 'none')):
        if value != off:
            family[key] = value
    if reduction != 'none':
        loss_grad = numpy.asarray(rng.uniform(0.5, 2.0))
    kw = dict(soft_label=soft_label, ignore_index=ignore_index, axis=axis)
    x_dev, label_dev, g_dev = xp.asarray(x), xp.asarray(label), xp.asarray(loss_grad)
    analytic = numpy.asarray(_to_host(analytic_gradient(xp, x_dev, label_dev, g_dev, path=path, family=family,
                                                        **kw)))

    def objective(values):
        if family:
            loss = cupy_sce.forward(xp.asarray(values), label_dev, **kw, **family)[0]
        else:
            loss = cupy_sce.softmax_with_cross_entropy(xp.asarray(values), label_dev, **kw)
        return float((_to_host(loss) * loss_grad).sum())

    numeric = numpy.empty_like(x)
    flat_x, flat_numeric = x.reshape(-1), numeric.reshape(-1)
    for i in range(flat_x.size):
        saved = flat_x[i]
        flat_x[i] = saved + eps
        f_plus = objective(x)
        flat_x[i] = saved - eps
        f_minus = objective(x)
        flat_x[i] = saved
        flat_numeric[i] = (f_plus - f_minus) / (2 * eps)
    err = numpy.abs(analytic - numeric)
    max_abs = float(err.max()) if err.size else 0.0
    max_rel = float((err / numpy.maximum(numpy.abs(numeric), 1e-12)).max()) if err.size else 0.0
    passed = bool(numpy.all(err <= atol + rtol * numpy.abs(numeric)))
    return GradcheckResult(max_abs, max_rel, passed)


def check_linear_gradient(batch=(7,), H=4, V=6, bias=True, reduction='mean', chunk_size=3, xp=numpy, seed=0,
                          eps=1e-6, atol=1e-6, rtol=1e-5, **family):
    """The fused linear + cross entropy's ``grad_hidden``, ``grad_weight`` and ``grad_bias``
    (``cupy_sce.linear``) against central differences of its loss (float64), chunked by
    ``chunk_size``; ``family``: its loss-family keywords.  Returns a ``GradcheckResult`` over the
    three gradients."""
    from cupy_sce import linear
    rng = numpy.random.default_rng(seed)
    inputs = [rng.standard_normal(tuple(batch) + (H,)), rng.standard_normal((V, H)) / numpy.sqrt(H) * 2]
    if bias:
        inputs.append(rng.standard_normal(V) * 0.1)
    label = rng.integers(0, V, tuple(batch))
    label.reshape(-1)[0] = -100  # an ignored row
    loss_grad = rng.uniform(0.5, 2.0, tuple(batch)) if reduction == 'none' else numpy.asarray(rng.uniform(0.5, 2.0))
    kw = dict(reduction=reduction, chunk_size=chunk_size, **family)
    dev = [xp.asarray(a) for a in inputs]
    b = dev[2] if bias else None
    grads = linear.linear_cross_entropy_forward_backward(dev[0], dev[1], xp.asarray(label), b, xp.asarray(loss_grad),
                                                         **kw)[1:1 + len(inputs)]

    def objective():
        loss = linear.linear_cross_entropy(*[xp.asarray(a) for a in inputs[:2]], xp.asarray(label),
                                           xp.asarray(inputs[2]) if bias else None, **kw)
        return float((_to_host(loss) * loss_grad).sum())

    errors, numerics = [], []
    for array, grad in zip(inputs, grads):
        numeric = numpy.empty_like(array)
        flat, flat_numeric = array.reshape(-1), numeric.reshape(-1)
        for i in range(flat.size):
            saved = flat[i]
            flat[i] = saved + eps
            f_plus = objective()
            flat[i] = saved - eps
            f_minus = objective()
            flat[i] = saved
            flat_numeric[i] = (f_plus - f_minus) / (2 * eps)
        errors.append(numpy.abs(numpy.asarray(_to_host(grad)) - numeric).ravel())
        numerics.append(numpy.abs(numeric).ravel())
    err, numeric = numpy.concatenate(errors), numpy.concatenate(numerics)
    max_rel = float((err / numpy.maximum(numeric, 1e-12)).max()) if err.size else 0.0
    return GradcheckResult(float(err.max()) if err.size else 0.0, max_rel,
                           bool(numpy.all(err <= atol + rtol * numeric)))


def linear_cases():
    """The fused linear + cross entropy cases of ``scripts/gradcheck.py``: (name, kwargs for
    check_linear_gradient)."""
    cases = []
    for reduction in ('none', 'mean', 'sum'):
        for bias in (False, True):
            cases.append(('linear {} bias={} chunk=3'.format(reduction, bias),
                          dict(reduction=reduction, bias=bias, chunk_size=3)))
    cases.append(('linear (2, 3) all features chunk=4', dict(batch=(2, 3), chunk_size=4, label_smoothing=0.1,
                                                             z_loss=0.05, softcap=2.0)))
    return cases


def _to_host(a):
    return a.get() if hasattr(a, 'get') else a


def default_cases():
    """The matrix ``scripts/gradcheck.py`` runs: (name, kwargs for check_gradient)."""
    cases = []
    shapes = [((6, 5), 1), ((6, 5), 0), ((6, 5), -1), ((3, 4, 5), 1), ((3, 4, 5), -1),
              ((2, 3, 4, 3), 1), ((2, 3, 4, 3), 0), ((2, 3, 2, 4), -1)]
    for shape, axis in shapes:
        for path in PATHS:
            cases.append(('hard {} axis={} {}'.format(shape, axis, path),
                          dict(shape=shape, axis=axis, path=path)))
    for shape, axis in [((6, 5), -1), ((3, 4, 5), 1), ((2, 3, 4, 3), 0)]:
        for path in PATHS:
            cases.append(('hard ignore_index=2 {} axis={} {}'.format(shape, axis, path),
                          dict(shape=shape, axis=axis, path=path, ignore_index=2)))
            cases.append(('soft {} axis={} {}'.format(shape, axis, path),
                          dict(shape=shape, axis=axis, path=path, soft_label=True)))
            cases.append(('soft unnormalized {} axis={} {}'.format(shape, axis, path),
                          dict(shape=shape, axis=axis, path=path, soft_label=True,
                               normalized=False)))
    cases.append(('hard K=1 (4, 1) lse', dict(shape=(4, 1), path='lse')))
    # the loss family: each feature alone and all together, each reduction, both backward paths
    features = [('weight', dict(weight=True)), ('smoothing', dict(label_smoothing=0.2)),
                ('z-loss', dict(z_loss=0.05)), ('softcap', dict(softcap=1.5)),
                ('all', dict(weight=True, label_smoothing=0.2, z_loss=0.05, softcap=1.5))]
    for feature, options in features:
        for reduction in ('none', 'mean', 'sum'):
            for soft_label, (shape, axis) in ((False, ((6, 5), -1)), (True, ((3, 4, 5), 1))):
                for path in ('lse', 'fused'):
                    cases.append(('{} {} {} {} axis={} {}'.format(
                        feature, reduction, 'soft' if soft_label else 'hard', shape, axis, path),
                        dict(shape=shape, axis=axis, path=path, soft_label=soft_label,
                             ignore_index=-100 if soft_label else 2, reduction=reduction, **options)))
    return cases
