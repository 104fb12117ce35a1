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
