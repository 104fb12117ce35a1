"""The loss family on probabilities (``use_softmax=False``), on either array module.

There is no softmax to fuse here (a row's loss is ``w * -sum_k t_k log p_k`` and its gradient
``-loss_grad * w * t_k / p_k``), so this is a short composition of array operations that runs as
it is on NumPy and on CuPy arrays.  It takes the checked ``_Problem`` of ``_api``, like the
backends, and the same target ``t`` and row weight ``w``: the one-hot or soft label, smoothed
(``(1 - eps) t + eps / K``), and ``w = sum_k t_k weight_k``.
"""
import numpy

from cupy_sce import _numpy_backend
from cupy_sce._numpy_backend import _quiet


def _class_sum(a):
    """Sum over the class axis of an ``(outer, K, inner)`` array, as ``(outer, inner)``.

    NumPy: in the NumPy backend's order, which depends on K alone (README, batch invariance):
    class by class across rows for K <= SMALL_K, else along contiguous rows in blocks.  CuPy:
    its reduction kernel, whose order may depend on the shape (the one documented exception).
    """
    if not isinstance(a, numpy.ndarray):
        return a.sum(axis=1)
    outer, K, inner = a.shape
    if K <= _numpy_backend.SMALL_K:
        return _numpy_backend._row_sum(a)[:, 0, :]
    rows = numpy.ascontiguousarray(a.transpose(0, 2, 1)).reshape(outer * inner, K)
    return _numpy_backend._blocked_sum(rows).reshape(outer, inner)


class _Rows:
    """The hard labels' masks and safe indices, or the soft labels' smoothed target."""

    def __init__(self, p):
        xp = p.xp
        self.ignored = self.bad = None
        self.target = None
        self.bad_row = None
        eps = p.label_smoothing
        if p.soft_label:
            self.target = p.label if not eps else (1 - eps) * p.label + eps / max(p.K, 1)
            self.weight = None
            if p.weight is not None:  # a class the target does not touch adds 0, even at weight NaN
                self.weight = _class_sum(xp.where(self.target == 0, 0, self.target * p.weight[:, None]))
            return
        self.ignored = p.ignored()
        self.bad = ~self.ignored & ((p.label < 0) | (p.label >= p.K))
        self.index = xp.where(self.ignored | self.bad, 0, p.label)
        self.weight = None if p.weight is None else p.hard_row_weight(self.index)
        if p.check_labels:  # one scalar read back, as the kernels' label check
            bad = self.bad.ravel()
            first = int(xp.where(bad.any(), xp.argmax(bad), -1)) if bad.size else -1
            self.bad_row = first if first >= 0 else None

    def mask(self, rows_or_tile, xp):
        """Ignored rows 0, unchecked bad rows NaN (selected: their inputs may be anything)."""
        if self.ignored is None:
            return rows_or_tile
        shape = (-1, 1, self.ignored.shape[1]) if rows_or_tile.ndim == 3 else self.ignored.shape
        rows_or_tile = xp.where(self.ignored.reshape(shape), 0, rows_or_tile)
        return xp.where(self.bad.reshape(shape), numpy.nan, rows_or_tile)


@_quiet
def forward_out(p, loss):
    """Row losses into ``loss`` ((outer, inner), compute dtype); returns the first bad row."""
    rows = _Rows(p)
    _write_loss(p, rows, loss)
    return rows.bad_row


def _write_loss(p, rows, loss):
    xp, eps = p.xp, p.label_smoothing
    log_p = xp.log(p.x.astype(p.acc_dtype, copy=False))  # (outer, K, inner)
    if rows.target is not None:
        # a zero target adds 0 even where p_k = 0 (0 * -inf would be NaN)
        ce = -_class_sum(xp.where(rows.target == 0, 0, rows.target * log_p))
    else:
        ce = -(1 - eps) * xp.take_along_axis(log_p, rows.index[:, None, :], axis=1)[:, 0, :]
        if eps:
            ce = ce - eps / max(p.K, 1) * _class_sum(log_p)
    if rows.weight is not None:
        ce = ce * rows.weight
    loss[...] = rows.mask(ce, xp)


@_quiet
def forward_backward_out(p, loss_grad, loss, grad):
    """Row losses (if ``loss`` is given) and the gradient w.r.t. the probabilities into ``grad``
    ((outer, K, inner), may be ``p.x``: in place); ``loss_grad`` per row or None (ones)."""
    xp, eps = p.xp, p.label_smoothing
    rows = _Rows(p)
    if loss is not None:
        _write_loss(p, rows, loss)
    probs = p.x.astype(p.acc_dtype)  # a copy: grad may be p.x
    if rows.target is not None:
        # d/dp_k -sum_j t_j log p_j = -t_k / p_k; a zero target gives 0 even where p_k = 0
        dp = -xp.where(rows.target == 0, 0, rows.target / probs)
    else:
        dp = xp.zeros_like(probs) if not eps else -(eps / max(p.K, 1)) / probs
        picked = xp.take_along_axis(probs, rows.index[:, None, :], axis=1)
        on_label = xp.take_along_axis(dp, rows.index[:, None, :], axis=1) - (1 - eps) / picked
        xp.put_along_axis(dp, rows.index[:, None, :], on_label, axis=1)
    scale = None if loss_grad is None else loss_grad
    if rows.weight is not None:
        scale = rows.weight if scale is None else scale * rows.weight
    if scale is not None:
        dp = dp * scale[:, None, :]
    grad[...] = rows.mask(dp, xp)
    return rows.bad_row
