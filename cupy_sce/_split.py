"""Cross entropy of rows whose classes are split into slices: the per-slice partial sums, the
per-row terms from their totals, the loss and a slice's gradient.

Shared by :mod:`cupy_sce.distributed` (a slice per rank, the totals from all-reduces) and
:mod:`cupy_sce.dask` (a slice per chunk, the totals from Dask's tree reductions).  Every function
takes the array module ``xp`` (NumPy or CuPy), the picklable :class:`Options`, and 2-D
``(rows, K_slice)`` arrays in the compute dtype; per-row values are 1-D ``(rows,)``.

Steps, for each row:

1. ``shift``: the max of the (soft-capped) logits ``y`` over every slice (a max reduction; 0 for
   a row of -inf, whose exponentials are then 0).
2. ``forward_columns``: each slice's partial sums relative to ``shift`` -- the other classes'
   ``sum exp(y - shift)`` (the label's own term left out, not subtracted), the label's logit and
   a 1 from the slice that holds the label, and what the features need (``sum_k (y_k - shift)``
   for label smoothing, the label's class weight, the soft labels' sums) -- plus two scalars, the
   slice's class count and its weights' sum.
3. ``forward_terms``: from their totals, the lse, the cross-entropy term (a hard label's as
   ``log1p`` of the other classes relative to the label's logit: exact for a confident
   prediction), ``sum_k t_k``, the row weight and the masks of ignored and bad rows.
4. ``row_loss`` and ``slice_gradient`` (the label's ``softmax - 1`` from ``expm1``).
"""
import typing

import numpy

from cupy_sce._numpy_backend import _EXP_HEADROOM  # by dtype char, as the kernels' exp_headroom


class Options(typing.NamedTuple):
    """What the steps need of a call (picklable: Dask ships it to its workers)."""
    soft_label: bool
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: typing.Optional[float]
    acc: str            # the compute dtype's name
    weighted: bool


class Terms:
    """The per-row terms every slice shares (compute dtype): ``lse = shift + log_sum_exp``, the
    cross-entropy term ``ce``, ``label_ce`` (hard: lse - y[label]), ``T = sum_k t_k``, the row
    weight ``w`` (None without weights), V, and the masks ``ignored`` and ``bad`` (hard)."""


def capped(xp, o, x):
    """y: the logits the loss sees (Gemma 2's soft cap, or x)."""
    return x if o.softcap is None else o.softcap * xp.tanh(x / o.softcap)


def slice_max(xp, o, y):
    return y.max(axis=1) if y.shape[1] else xp.full(y.shape[0], -numpy.inf, o.acc)


def finite_shift(xp, row_max):
    return xp.where(xp.isneginf(row_max), xp.zeros((), row_max.dtype), row_max)


def _gather(xp, array, index):
    return xp.take_along_axis(array, index[:, None], axis=1)[:, 0]


def owned(xp, label, start, K):
    """(rows whose global label falls in this slice [start, start + K), its local index or 0)."""
    local = label - start
    mine = (local >= 0) & (local < K)
    return mine, xp.where(mine, local, 0)


def forward_columns(xp, o, y, shift, label=None, start=0, soft=None, weight=None):
    """Step 2 on one slice: (per-row columns, scalars) to be summed over the slices.  ``label``:
    global hard labels (rows,); ``soft``: this slice of the soft labels, already times
    ``1 - eps``; ``weight``: this slice of the class weights."""
    K = y.shape[1]
    rel = y - shift[:, None]                        # y_k - max <= 0
    # the sums of rel first: the exponentials then overwrite it (one N x K buffer a slice)
    spread = rel.sum(axis=1) if o.label_smoothing else None  # sum_k (y_k - max): not the offset
    # a zero target adds 0 even at y = -inf
    label_dot = xp.where(soft == 0, 0, soft * (-rel)).sum(axis=1) if o.soft_label else None
    e = xp.exp(rel, out=rel)
    scalars = [float(K)]
    if o.soft_label:
        columns = [e.sum(axis=1), soft.sum(axis=1), label_dot]
    else:
        mine, col = owned(xp, label, start, K)
        picked = xp.where(mine, _gather(xp, y, col), 0) if K else xp.zeros(y.shape[0], o.acc)
        if K:
            xp.put_along_axis(e, col[:, None], xp.where(mine, 0, _gather(xp, e, col))[:, None], axis=1)
        columns = [e.sum(axis=1), picked, mine]     # the other classes' sum: the label's term left out
    if o.label_smoothing:
        columns.append(spread)
    _add_row_weight_parts(xp, o, columns, scalars, weight, soft, None if o.soft_label else (mine, col))
    return columns, scalars


def _add_row_weight_parts(xp, o, columns, scalars, weight, soft, owner):
    """The row weight's parts of a slice (with class weights): its weights' sum (a scalar) and, per
    row, the label's class weight where this slice holds the label (``owner``: ``owned``'s pair),
    or ``sum_k label_k weight_k`` (soft; a class no label touches adds 0, even at weight NaN)."""
    if not o.weighted:
        return
    scalars.append(weight.sum())
    if o.soft_label:
        columns.append(xp.where(soft == 0, 0, soft * weight).sum(axis=1))
    else:
        mine, col = owner
        columns.append(xp.where(mine, weight[col], 0) if weight.shape[0] else xp.zeros(mine.shape[0], o.acc))


def n_forward_columns(o):
    return 3 + bool(o.label_smoothing) + bool(o.weighted)


def forward_terms(xp, o, shift, sums, scalars, label=None):
    """Step 3 from the totals of ``forward_columns`` over all slices."""
    t = Terms()
    V = t.V = scalars[0]
    eps = o.label_smoothing
    if o.soft_label:
        total, label_sum, label_dot = sums[:3]
        t.log_sum_exp = xp.log(total)
        # sum_k t_k (lse - y_k) with t = (1 - eps) label + eps / V (the label already scaled)
        t.T = label_sum + eps if eps else label_sum
        t.ce = t.T * t.log_sum_exp + label_dot
        if eps:
            t.ce = t.ce - (eps / V) * sums[3]
        t.ignored = t.bad = None
    else:
        others, picked, owners = sums[:3]
        t.ignored = label == o.ignore_index
        t.bad = (~t.ignored) & (owners < 0.5)       # no slice holds the label: out of [0, V)
        label_rel = picked - shift
        # a row whose label no slice holds (ignored, or bad) left no term out of `others`
        total = others + xp.where(owners > 0.5, xp.exp(label_rel), 0)
        t.log_sum_exp = xp.log(total)
        # lse - y[label] = log1p(sum_{k != label} exp(y_k - y[label])): exact for a confident
        # prediction; a label far below the lse (the factor would overflow) takes the difference
        # (a label logit further than the headroom below the lse: the factor would overflow)
        near = label_rel >= t.log_sum_exp - _EXP_HEADROOM[numpy.dtype(o.acc).char]
        t.label_ce = xp.where(near, xp.log1p(others * xp.exp(-xp.where(near, label_rel, 0))),
                              t.log_sum_exp - label_rel)
        t.T = 1
        t.ce = (1 - eps) * t.label_ce + eps * (t.log_sum_exp - sums[3] / V) if eps else t.label_ce
    t.lse = shift + t.log_sum_exp
    t.w = row_weight(o, sums[-1], scalars, V)
    return t


def row_weight(o, label_weight, scalars, V):
    """Paddle's row weight ``sum_k t_k weight_k``: ``(1 - eps) weight[label] + eps mean(weight)`` for a
    hard label, ``sum_k (1 - eps) label_k weight_k + eps mean(weight)`` for soft ones (their
    ``label_weight`` already carries the ``1 - eps``); None without weights."""
    if not o.weighted:
        return None
    eps = o.label_smoothing
    if not eps:
        return label_weight
    return (label_weight if o.soft_label else (1 - eps) * label_weight) + eps * scalars[1] / V


def backward_columns(xp, o, y, label=None, start=0, soft=None, weight=None):
    """The backward from a stored lse: (columns, scalars) for V, the label's owner and logit, and
    what the row weight and ``sum_k t_k`` need."""
    K = y.shape[1]
    scalars = [float(K)]
    if o.soft_label:
        columns = [soft.sum(axis=1)]
    else:
        mine, col = owned(xp, label, start, K)
        columns = [mine, xp.where(mine, _gather(xp, y, col), 0) if K else xp.zeros(y.shape[0], o.acc)]
    _add_row_weight_parts(xp, o, columns, scalars, weight, soft, None if o.soft_label else (mine, col))
    return columns, scalars


def n_backward_columns(o):
    return (1 if o.soft_label else 2) + bool(o.weighted)


def backward_terms(xp, o, lse, sums, scalars, label=None):
    t = Terms()
    t.V = V = scalars[0]
    t.lse = lse
    t.log_sum_exp = xp.zeros_like(lse)              # the softmax is exp(y - lse) from the stored lse
    eps = o.label_smoothing
    if o.soft_label:
        t.T = sums[0] + eps if eps else sums[0]
        t.ignored = t.bad = None
    else:
        t.T = 1
        t.ignored = label == o.ignore_index
        t.bad = (~t.ignored) & (sums[0] < 0.5)
        t.label_ce = lse - sums[1]                  # lse - y[label], as exact as the stored lse
    t.w = row_weight(o, sums[-1], scalars, V)
    return t


def row_loss(xp, o, t):
    """``w * (ce + z lse**2)`` per row; 0 where ignored, NaN for a bad label."""
    loss = t.ce + o.z_loss * t.lse * t.lse if o.z_loss else t.ce
    if t.w is not None:
        loss = loss * t.w
    if t.ignored is not None:
        loss = xp.where(t.ignored, 0, loss)
        loss = xp.where(t.bad, numpy.nan, loss)
    return loss


def divided(xp, value, divisor):
    """``value / divisor`` for reduction='mean', 0 where the divisor is 0 (every row ignored, or
    weights summing to 0), on ``value``'s device.  The quotient by 0 is computed and dropped (no
    second select to avoid it: on CuPy each array operation is a launch and host time)."""
    divisor = xp.asarray(divisor, dtype=value.dtype)
    with numpy.errstate(divide='ignore', invalid='ignore'):
        return xp.where(divisor == 0, xp.zeros((), value.dtype), value / divisor)


def counted_weight(xp, o, t):
    """Each row's share of reduction='mean''s divisor: its weight, or 1; 0 where ignored."""
    ones = xp.ones(t.lse.shape, o.acc) if t.w is None else t.w
    return ones if t.ignored is None else xp.where(t.ignored, 0, ones)


def slice_gradient(xp, o, x, y, t, g, label=None, start=0, soft=None):
    """d loss / d x on one slice (rows, K): ``g (softmax_k s - t_k)`` times the soft cap's slope,
    ``s = sum_k t_k + 2 z lse``; ``g`` per row is loss_grad times the row weight.  The label's own
    term is ``(softmax - 1) s + (s - 1) + (1 - t)`` with ``softmax - 1 = expm1(-(lse - y[label]))``."""
    scale = t.T + 2 * o.z_loss * t.lse if o.z_loss else t.T
    shift = t.lse - t.log_sum_exp
    grad = xp.subtract(y, shift[:, None])           # (y - shift) - log_sum_exp: no large lse subtracted
    grad -= t.log_sum_exp[:, None]
    xp.exp(grad, out=grad)
    grad *= (scale * g)[:, None]
    eps = o.label_smoothing
    if o.soft_label:
        target = soft + eps / t.V if eps else soft
        grad -= target * g[:, None]
    else:
        if eps:
            grad -= (eps / t.V) * g[:, None]
        mine, col = owned(xp, label, start, y.shape[1])
        if y.shape[1]:
            term = xp.expm1(-t.label_ce) * scale
            if o.z_loss:
                term = term + 2 * o.z_loss * t.lse
            if eps:
                term = term + (eps - eps / t.V)
            label_grad = xp.where(mine, term * g, _gather(xp, grad, col))
            xp.put_along_axis(grad, col[:, None], label_grad[:, None], axis=1)
    if o.softcap is not None:
        e = xp.exp(-2 * xp.abs(x / o.softcap))      # 1 - tanh(u)^2 = 4e / (1 + e)^2, exact at every u
        grad *= 4 * e / ((1 + e) * (1 + e))
    if not o.soft_label:  # last: selected, not multiplied (an ignored row's logits may be NaN or inf)
        if bool(t.ignored.any()):
            grad = xp.where(t.ignored[:, None], 0, grad)
        if bool(t.bad.any()):
            grad = xp.where(t.bad[:, None], numpy.nan, grad)
    return grad


# ---------------------------------------------------------------- probabilities as input (use_softmax=False)

def probability_columns(xp, o, probs, label=None, start=0, soft=None, weight=None):
    """One slice's partial sums when the inputs are probabilities ``p`` (no softmax): the label's
    ``log p`` and a 1 from the slice that holds it (hard), or ``sum_k label_k log p_k`` (soft, a
    zero label adding 0 even at p = 0); ``sum_k log p_k`` for smoothing; the row weight's parts."""
    K = probs.shape[1]
    log_p = xp.log(probs)
    scalars = [float(K)]
    if o.soft_label:
        columns = [xp.where(soft == 0, 0, soft * log_p).sum(axis=1)]
    else:
        mine, col = owned(xp, label, start, K)
        columns = [xp.where(mine, _gather(xp, log_p, col), 0) if K else xp.zeros(probs.shape[0], o.acc), mine]
    if o.label_smoothing:
        columns.append(log_p.sum(axis=1))
    _add_row_weight_parts(xp, o, columns, scalars, weight, soft, None if o.soft_label else (mine, col))
    return columns, scalars


def n_probability_columns(o):
    return (1 if o.soft_label else 2) + bool(o.label_smoothing) + bool(o.weighted)


def probability_terms(xp, o, sums, scalars, label=None):
    """The row terms of probabilities: ``ce = -sum_k t_k log p_k`` with ``t = (1 - eps) label + eps / V``
    (the soft label's sum already carries the ``1 - eps``), the row weight and the masks."""
    t = Terms()
    V = t.V = scalars[0]
    eps = o.label_smoothing
    if o.soft_label:
        t.ce = -sums[0]
        t.ignored = t.bad = None
    else:
        t.ignored = label == o.ignore_index
        t.bad = (~t.ignored) & (sums[1] < 0.5)
        t.ce = -(1 - eps) * sums[0] if eps else -sums[0]
    if eps:
        t.ce = t.ce - (eps / V) * sums[1 if o.soft_label else 2]
    t.lse = xp.zeros_like(t.ce)                     # no lse: only row_loss's z-loss reads it, and it is 0 here
    t.w = row_weight(o, sums[-1], scalars, V)
    return t


def probability_gradient(xp, o, probs, t, g, label=None, start=0, soft=None):
    """d loss / d p on one slice: ``-g t_k / p_k`` (a zero target gives 0 even at p = 0); ``g`` per
    row is loss_grad times the row weight."""
    eps = o.label_smoothing
    if o.soft_label:
        target = soft + eps / t.V if eps else soft
        grad = -xp.where(target == 0, 0, target / probs) * g[:, None]
    else:
        grad = (-(eps / t.V) / probs) * g[:, None] if eps else xp.zeros_like(probs)
        mine, col = owned(xp, label, start, probs.shape[1])
        if probs.shape[1]:
            on_label = _gather(xp, grad, col) - (1 - eps) / _gather(xp, probs, col) * g
            xp.put_along_axis(grad, col[:, None], xp.where(mine, on_label, _gather(xp, grad, col))[:, None], axis=1)
        grad = xp.where(t.ignored[:, None], 0, grad)
        grad = xp.where(t.bad[:, None], numpy.nan, grad)
    return grad
