"""Independent float64 reference, written differently from the code under test.

It moves the class axis last and works in log space with ``logaddexp``, loops
over nothing clever, and spells out the contract's special cases (NaN/+inf
rows, ignored rows, zero soft labels at -inf logits) explicitly.
"""
import numpy


def _rows_last(a, axis):
    return numpy.moveaxis(numpy.asarray(a, dtype=numpy.float64), axis, -1)


def reference(logits, label, soft_label=False, ignore_index=-100, axis=-1, loss_grad=None):
    """Returns ``(loss, softmax, grad, lse)`` in float64, shaped like the operator's outputs."""
    logits = numpy.asarray(logits)
    axis = axis % logits.ndim
    x = _rows_last(logits, axis)                       # (..., K)
    K = x.shape[-1]
    poisoned = numpy.isnan(x).any(-1) | numpy.isposinf(x).any(-1)
    with numpy.errstate(all='ignore'):
        lse = numpy.logaddexp.reduce(x, axis=-1) if K else numpy.zeros(x.shape[:-1])
        lse = numpy.where(poisoned, numpy.nan, lse)
        log_softmax = x - lse[..., None]
        softmax = numpy.exp(log_softmax)
    if loss_grad is None:
        g = numpy.ones(x.shape[:-1])
    else:
        g = numpy.asarray(loss_grad, numpy.float64).reshape(x.shape[:-1])
    if soft_label:
        y = _rows_last(label, axis)
        with numpy.errstate(all='ignore'):
            terms = numpy.where(y == 0, 0.0, -y * log_softmax)
        loss = terms.sum(-1)
        grad = (softmax * y.sum(-1, keepdims=True) - y) * g[..., None]
    else:
        lab = numpy.asarray(label).astype(numpy.int64)
        if lab.ndim == logits.ndim:
            lab = numpy.squeeze(lab, axis)
        ignored = lab == ignore_index
        safe = numpy.where(ignored, 0, lab)
        onehot = numpy.arange(K) == safe[..., None]
        loss = -numpy.take_along_axis(log_softmax, safe[..., None], -1)[..., 0]
        loss = numpy.where(ignored, 0.0, loss)
        with numpy.errstate(all='ignore'):
            grad = (softmax - onehot) * g[..., None]
        grad = numpy.where(ignored[..., None], 0.0, grad)
    loss = numpy.expand_dims(loss, axis)
    return (loss, numpy.moveaxis(softmax, -1, axis), numpy.moveaxis(grad, -1, axis),
            numpy.expand_dims(lse, axis))


# ---------------------------------------------------------------------------- the loss family
#
# ``reference_family`` is the float64 reference of the loss family (weight, label smoothing, z-loss,
# softcap, reductions, probabilities as input).  Like ``reference`` it is written from the contract,
# not from the kernels: the class axis goes last, the target is a dense (rows, K) matrix, the
# log-softmax comes from ``numpy.logaddexp.reduce``, and every special case is an explicit mask.

_REDUCTIONS = ('none', 'mean', 'sum')


def _dense_target(label, shape_rows_k, axis, ndim, soft_label, ignore_index, label_smoothing):
    """The (..., K) float64 target matrix ``t`` and the boolean ``ignored`` mask of the rows."""
    K = shape_rows_k[-1]
    if soft_label:
        t = _rows_last(label, axis)
        ignored = numpy.zeros(shape_rows_k[:-1], dtype=bool)          # ignore_index has no effect
    else:
        lab = numpy.asarray(label).astype(numpy.int64)
        if lab.ndim == ndim:                                          # the size-1 class axis is kept
            lab = numpy.squeeze(lab, axis)
        ignored = lab == ignore_index
        safe = numpy.where(ignored, 0, lab)
        t = (numpy.arange(K) == safe[..., None]).astype(numpy.float64)   # one-hot
    if label_smoothing:
        t = (1.0 - label_smoothing) * t + label_smoothing / K
    t = numpy.where(ignored[..., None], 0.0, t)                       # an ignored row targets nothing
    return t, ignored


def reference_family(x, label, *, soft_label=False, ignore_index=-100, axis=-1, weight=None,
                     label_smoothing=0.0, z_loss=0.0, softcap=None, use_softmax=True, reduction='none',
                     loss_grad=None):
    """The loss family in float64.

    Returns a dict:

    * ``loss``: the row losses, shaped like ``x`` with ``shape[axis] = 1``, for ``reduction='none'``;
      a 0-d array for ``'mean'`` and ``'sum'``;
    * ``grad``: d(sum of loss_grad * loss)/dx (loss_grad a scalar for 'mean'/'sum', per row for
      'none'; None means ones), shaped like ``x``;
    * ``lse``: the per-row log-sum-exp of the (capped) logits (axis kept), None if not use_softmax;
    * ``row_weight``: w_row per row (axis kept), 0 for ignored rows;
    * ``normalizer``: D, the divisor of 'mean' (returned for every reduction).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError('reduction must be one of {}, got {!r}'.format(_REDUCTIONS, reduction))
    x_in = numpy.asarray(x)
    ndim = x_in.ndim
    axis = axis % ndim
    xl = _rows_last(x_in, axis)                                       # (..., K) float64
    rows_shape = xl.shape[:-1]
    K = xl.shape[-1]
    z_loss = float(z_loss)
    t, ignored = _dense_target(label, xl.shape, axis, ndim, soft_label, ignore_index,
                               float(label_smoothing))
    T = t.sum(-1)                                                     # sum_k t_k per row

    # 3. row weights
    if weight is None:
        w_row = numpy.where(ignored, 0.0, 1.0)
    else:
        wv = numpy.asarray(weight, dtype=numpy.float64).reshape(K)
        w_row = (t * wv).sum(-1)                                      # t is 0 on ignored rows
        w_row = numpy.where(ignored, 0.0, w_row)

    # 6. the normalizer of 'mean'
    if weight is not None:
        D = float(w_row[~ignored].sum())
    elif soft_label:
        D = float(numpy.prod(rows_shape))
    else:
        D = float((~ignored).sum())

    # 7. the upstream gradient of each row
    if reduction == 'none':
        g = numpy.ones(rows_shape) if loss_grad is None else \
            numpy.asarray(loss_grad, numpy.float64).reshape(rows_shape)
    else:
        scalar = 1.0 if loss_grad is None else float(numpy.asarray(loss_grad, numpy.float64))
        if reduction == 'sum':
            g = numpy.full(rows_shape, scalar)
        else:
            g = numpy.full(rows_shape, scalar / D if D != 0 else 0.0)

    with numpy.errstate(all='ignore'):
        if use_softmax:
            # 1. softcap
            if softcap is not None:
                c = float(softcap)
                y = c * numpy.tanh(xl / c)
                dy_dx = 1.0 - numpy.tanh(xl / c) ** 2
            else:
                y = xl
                dy_dx = numpy.ones_like(xl)
            # 8. a NaN or +inf (capped) logit poisons its row
            poisoned = numpy.isnan(y).any(-1) | numpy.isposinf(y).any(-1)
            lse = numpy.logaddexp.reduce(y, axis=-1) if K else numpy.full(rows_shape, -numpy.inf)
            lse = numpy.where(poisoned, numpy.nan, lse)
            log_softmax = y - lse[..., None]
            softmax = numpy.exp(log_softmax)
            # 4. ce_row = sum_k t_k (lse - y_k), a zero target contributing 0 even at y_k = -inf
            terms = numpy.where(t == 0, 0.0, -t * log_softmax)
            ce = terms.sum(-1)
            ce = numpy.where(poisoned, numpy.nan, ce)
            row_loss = w_row * (ce + z_loss * lse ** 2)
            dL_dy = (g * w_row)[..., None] * (softmax * (T + 2.0 * z_loss * lse)[..., None] - t)
            dL_dy = numpy.where(poisoned[..., None], numpy.nan, dL_dy)
            grad = dL_dy * dy_dx
        else:
            # 5. x holds probabilities p
            p = xl
            terms = numpy.where(t == 0, 0.0, -t * numpy.log(p))
            row_loss = w_row * terms.sum(-1)
            grad = numpy.where(t == 0, 0.0, -(g * w_row)[..., None] * t / p)
            lse = None

    # 2. ignored rows: loss 0 and gradient 0 whatever their logits
    row_loss = numpy.where(ignored, 0.0, row_loss)
    grad = numpy.where(ignored[..., None], 0.0, grad)

    if reduction == 'none':
        loss = numpy.expand_dims(row_loss, axis)
    else:
        total = row_loss.sum()
        if reduction == 'sum':
            loss = numpy.asarray(total, dtype=numpy.float64)
        elif D == 0:                                                  # nothing to average over
            loss = numpy.asarray(0.0)
            grad = numpy.zeros_like(grad)
        else:
            loss = numpy.asarray(total / D, dtype=numpy.float64)
    return {
        'loss': loss,
        'grad': numpy.moveaxis(grad, -1, axis),
        'lse': None if lse is None else numpy.expand_dims(lse, axis),
        'row_weight': numpy.expand_dims(w_row, axis),
        'normalizer': D,
    }
