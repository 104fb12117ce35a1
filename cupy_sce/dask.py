"""The cross entropy on Dask arrays: rows and classes split over chunks, lazily, never a whole row.

    import dask.array as da
    from cupy_sce import dask as sce_dask
    logits = da.from_zarr(...)                       # (N, V), chunked along both axes
    loss, lse = sce_dask.forward(logits, label)      # lazy Dask arrays
    loss.sum().compute()                             # any scheduler: threads, processes, a cluster

The chunks may be NumPy or CuPy arrays (dask-cuda).  The class axis is split over any number of
chunks: each chunk yields its rows' partial sums relative to the row max (cupy_sce._split: the
other classes' ``sum exp(y - max)``, the label's logit where the chunk holds it, and what the
features need), Dask's tree reductions merge them (first the row max, then the sums), and the
gradient maps over the chunks with the merged per-row terms broadcast.  The graph never
concatenates a row, so memory is a few chunks per worker thread whatever the problem's size.

The functions are those of the array API with its semantics: :func:`forward`, :func:`backward`,
:func:`forward_backward`, :func:`cross_entropy` (hard or soft labels, ``ignore_index``, class
weights, label smoothing, z-loss, soft cap, every reduction, any axis, ``use_softmax=False`` for
probabilities as input).
Results agree with the single-array functions to rounding (the sums are split differently), and
are the same bits on every scheduler (the merge order is fixed by the graph).  A bad label raises
``IndexError`` when the result is computed (unless ``cupy_sce.label_check(False)`` is active
when the graph is built: then its row is NaN).

This module imports dask; importing ``cupy_sce`` alone never does.
"""
import numpy

import dask.array as da

from cupy_sce import _api, _dtypes, _split
from cupy_sce._numpy_backend import _quiet

# the per-row terms a chunk of rows carries from the merge to the loss and the gradient
_LSE, _LOG_SUM_EXP, _LABEL_CE, _T, _W, _IGNORED, _BAD, _LOSS = range(8)
_N_TERMS = 8


def _xp(block):
    return _api.get_array_module(block)


def _rows(block, acc, xp=None):
    """A chunk with the class axis last as (rows, K) in the compute dtype (on ``xp``'s device: a
    label or weight chunk may be a NumPy array beside CuPy logits)."""
    xp = xp or _xp(block)
    rows = int(numpy.prod(block.shape[:-1]))
    return xp.ascontiguousarray(xp.asarray(block)).reshape(rows, block.shape[-1]).astype(acc, copy=False)


class _Graph:
    """The checked call: the logits as a Dask array with the class axis last, the labels and the
    weight chunked like them, the options, and the blockwise index names."""

    def __init__(self, logits, label, soft_label, ignore_index, axis, weight, label_smoothing, z_loss, softcap,
                 reduction, logits_name='logits', use_softmax=True):
        if not isinstance(logits, da.Array):
            logits = da.asarray(logits)
        _api._check_logits(logits, logits_name)
        if any(numpy.isnan(c) for chunks in logits.chunks for c in chunks):
            raise ValueError('{} has unknown chunk sizes (after boolean indexing, say): call '
                             '.compute_chunk_sizes() first'.format(logits_name))
        p = _api._Problem(numpy, None, None, soft_label, ignore_index, axis, shape=logits.shape, dtype=logits.dtype,
                          label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, logits_name=logits_name)
        self.p = p
        self.use_softmax = _api._check_use_softmax(use_softmax, p)
        self.reduction = _api._check_reduction(reduction)
        self.check_labels = p.check_labels
        self.x = da.moveaxis(logits, p.axis, -1)                        # (*rows, V)
        self.row_chunks, self.class_chunks = self.x.chunks[:-1], self.x.chunks[-1]
        self.rows = tuple('r{}'.format(i) for i in range(self.x.ndim - 1))
        # each class chunk's global class indices (a chunk reads its first): chunked like the classes
        self.classes = da.arange(p.K, chunks=(self.class_chunks,), dtype=numpy.int64)
        self.V = p.K
        self.label = self.soft = None
        label = label if isinstance(label, da.Array) else da.asarray(label)
        p.check_label(label)
        if p.soft_label:
            self.soft = da.moveaxis(label, p.axis, -1).rechunk(self.x.chunks)
        else:
            self.label = label.reshape(p.row_shape).astype(numpy.int64).rechunk(self.row_chunks)
        self.weight = None
        if weight is not None:
            weight = weight if isinstance(weight, da.Array) else da.asarray(weight)
            if not _dtypes.is_float(weight.dtype):
                raise TypeError('weight must be a floating array, got {}'.format(weight.dtype))
            if weight.shape != (p.K,):
                raise ValueError('weight must be a 1-D array of length K={} (the classes along axis {}), got '
                                 'shape {}'.format(p.K, p.axis, weight.shape))
            self.weight = weight.rechunk((self.class_chunks,))
        self.options = _split.Options(p.soft_label, p.ignore_index, p.label_smoothing, p.z_loss, p.softcap,
                                      p.acc_dtype.name, self.weight is not None)
        self.empty = p.outer * p.inner == 0
        self.arrays = [(logits_name, logits), ('label', label), ('weight', weight)]

    def check_float_mix(self, *named):
        """The array API's rule: beside bfloat16, other floating arrays are bfloat16 or float32."""
        _dtypes.check_float_mix([(n, a) for n, a in self.arrays + list(named)
                                 if a is not None and getattr(a, 'ndim', 0)])

    def class_args(self):
        """The blockwise arguments a class chunk needs besides the logits: its class indices (the
        first is its offset), the labels, its slice of the soft labels and of the weights (None
        when absent)."""
        r = self.rows
        return [self.classes, ('z',),
                self.label, (r if self.label is not None else None),
                self.soft, (r + ('z',) if self.soft is not None else None),
                self.weight, (('z',) if self.weight is not None else None)]


# ---------------------------------------------------------------- the chunks' functions

@_quiet
def _row_max_chunk(x, o):
    xp = _xp(x)
    y = _split.capped(xp, o, _rows(x, o.acc))
    return _split.slice_max(xp, o, y).reshape(x.shape[:-1] + (1,))


@_quiet
def _columns_chunk(x, shift, classes, label, soft, weight, o, mode):
    """One chunk's partial sums (cupy_sce._split), stacked as (columns, *rows, 1).  ``mode``:
    'forward', 'backward' (from a stored lse) or 'probs' (probabilities as input)."""
    xp = _xp(x)
    xr = _rows(x, o.acc)
    y = xr if mode == 'probs' else _split.capped(xp, o, xr)
    start = int(classes[0]) if classes.size else 0
    label = None if label is None else xp.asarray(label).reshape(-1)
    soft = None if soft is None else _rows(soft, o.acc, xp) * (1 - o.label_smoothing)
    weight = None if weight is None else xp.asarray(weight).astype(o.acc)
    if mode == 'probs':
        columns, _ = _split.probability_columns(xp, o, y, label, start, soft, weight)
    elif mode == 'backward':
        columns, _ = _split.backward_columns(xp, o, y, label, start, soft, weight)
    else:
        columns, _ = _split.forward_columns(xp, o, y, shift.reshape(-1), label, start, soft, weight)
    return xp.stack([xp.asarray(c, dtype=o.acc) for c in columns]).reshape((len(columns),) + x.shape[:-1] + (1,))


def _raise_bad_label(label, bad, block_info, V, ignore_index):
    first = int(numpy.flatnonzero(numpy.asarray(bad).reshape(-1))[0])
    local = numpy.unravel_index(first, label.shape)
    offset = [lo for lo, _ in block_info[2]['array-location']] if block_info else [0] * len(local)
    position = tuple(int(a) + int(b) for a, b in zip(local, offset))
    raise IndexError('label value {} at position {} (the class axis left out) is out of range for K={} classes '
                     '(valid: [0, {}) or ignore_index={})'.format(int(label.reshape(-1)[first]), position, V, V,
                                                                 ignore_index))


@_quiet
def _terms_chunk(shift, sums, label, lse, o, V, weight_sum, check, mode, block_info=None):
    """A chunk of rows' terms from the merged sums (forward, probs) or the stored lse (backward),
    stacked as (_N_TERMS, *rows)."""
    xp = _xp(sums)
    rows = sums.shape[1:]
    flat_sums = [s.reshape(-1) for s in sums]
    scalars = [float(V), weight_sum]
    flat_label = None if label is None else xp.asarray(label).reshape(-1)
    if mode == 'probs':
        t = _split.probability_terms(xp, o, flat_sums, scalars, flat_label)
        t.log_sum_exp, t.T = t.lse, 0
    elif mode == 'backward':
        t = _split.backward_terms(xp, o, lse.reshape(-1), flat_sums, scalars, flat_label)
    else:
        t = _split.forward_terms(xp, o, shift.reshape(-1), flat_sums, scalars, flat_label)
    if check and t.bad is not None and bool(t.bad.any()):
        _raise_bad_label(label, t.bad, block_info, V, o.ignore_index)
    n = flat_sums[0].shape[0]
    zeros = xp.zeros(n, o.acc)
    stacked = [t.lse, t.log_sum_exp, getattr(t, 'label_ce', zeros), xp.broadcast_to(xp.asarray(t.T, o.acc), (n,)),
               zeros + 1 if t.w is None else t.w,
               zeros if t.ignored is None else t.ignored, zeros if t.bad is None else t.bad,
               zeros if mode == 'backward' else _split.row_loss(xp, o, t)]
    return xp.stack([xp.asarray(v, dtype=o.acc) for v in stacked]).reshape((_N_TERMS,) + rows)


def _unstack(terms, o):
    flat = terms.reshape(_N_TERMS, -1)
    t = _split.Terms()
    t.lse, t.log_sum_exp, t.label_ce, t.T = flat[_LSE], flat[_LOG_SUM_EXP], flat[_LABEL_CE], flat[_T]
    t.w = flat[_W] if o.weighted else None
    t.ignored = None if o.soft_label else flat[_IGNORED] != 0
    t.bad = None if o.soft_label else flat[_BAD] != 0
    return t


@_quiet
def _gradient_chunk(x, terms, g, classes, label, soft, weight, o, V, dtype, mode):
    """One chunk's gradient (*rows, K_chunk) from its rows' terms and per-row factor ``g``."""
    xp = _xp(x)
    xr = _rows(x, o.acc)
    t = _unstack(xp.asarray(terms), o)
    t.V = float(V)
    start = int(classes[0]) if classes.size else 0
    label = None if label is None else xp.asarray(label).reshape(-1)
    soft = None if soft is None else _rows(soft, o.acc, xp) * (1 - o.label_smoothing)
    g = xp.asarray(g, dtype=o.acc).reshape(-1)
    if t.w is not None:
        g = g * t.w
    if mode == 'probs':
        grad = _split.probability_gradient(xp, o, xr, t, g, label, start, soft)
    else:
        grad = _split.slice_gradient(xp, o, xr, _split.capped(xp, o, xr), t, g, label, start, soft)
    return grad.reshape(x.shape).astype(dtype, copy=False)


# ---------------------------------------------------------------- the graph

def _merged_terms(q, lse=None):
    """The per-row terms (_N_TERMS, *rows) as a Dask array: the row max and the sums of every
    chunk's partials, merged by Dask's tree reductions (forward), or from a stored lse (backward)."""
    o, r = q.options, q.rows
    if q.empty:  # no rows: nothing to merge (and Dask's max of a zero-size array raises)
        return da.zeros((_N_TERMS,) + q.p.row_shape, chunks=((_N_TERMS,),) + q.row_chunks, dtype=o.acc)
    mode = 'backward' if lse is not None else 'forward' if q.use_softmax else 'probs'
    shift = None
    if mode == 'forward':
        shift = da.blockwise(_row_max_chunk, r + ('z',), q.x, r + ('z',), o, None,
                             adjust_chunks={'z': 1}, dtype=o.acc).max(axis=-1)
        shift = shift.map_blocks(lambda m: _split.finite_shift(_xp(m), m), dtype=o.acc)
    n_columns = {'forward': _split.n_forward_columns, 'backward': _split.n_backward_columns,
                 'probs': _split.n_probability_columns}[mode](o)
    partial = da.blockwise(_columns_chunk, ('c',) + r + ('z',), q.x, r + ('z',),
                           shift, (r if shift is not None else None), *q.class_args(), o, None, mode, None,
                           new_axes={'c': n_columns}, adjust_chunks={'z': 1}, dtype=o.acc)
    sums = partial.sum(axis=-1)                                       # (columns, *rows): the tree reduction
    weight_sum = 0.0 if q.weight is None else q.weight.astype(o.acc).sum()
    label = q.label
    # map_blocks aligns the trailing (row) axes; the sums' columns axis (one chunk) becomes the terms'
    args = [shift if shift is not None else sums[0], sums, label if label is not None else sums[0],
            lse if lse is not None else sums[0]]
    return da.map_blocks(_terms_block, *args, weight_sum, o=o, V=q.V, check=q.check_labels, mode=mode,
                         hard=label is not None, chunks=((_N_TERMS,),) + q.row_chunks, dtype=o.acc)


def _terms_block(shift, sums, label, lse, weight_sum, o, V, check, mode, hard, block_info=None):
    """map_blocks' function (module level: Dask tokenizes it by name, a closure would be pickled)."""
    return _terms_chunk(shift if mode == 'forward' else None, sums, label if hard else None,
                        lse if mode == 'backward' else None, o, V, float(weight_sum), check, mode, block_info)


def _loss(q, terms):
    """The user's loss from the terms: per row in the loss shape, or the 0-d 'mean' / 'sum'."""
    p = q.p
    rows = terms[_LOSS]
    if q.reduction == 'none':
        return da.expand_dims(rows, p.axis).astype(p.dtype)
    total = rows.sum()
    if q.reduction == 'mean':
        total = _mean(total, _divisor(q))
    return total.astype(p.dtype)


def _mean(total, divisor):
    """``total / divisor``, 0 where the divisor is 0, on the total's device (the divisor comes from
    the labels, which may be host arrays beside CuPy logits)."""
    return da.blockwise(_mean_block, (), total, (), divisor, (), dtype=total.dtype)


def _mean_block(total, divisor):
    return _split.divided(_xp(total), total, divisor)


def _divisor(q):
    """reduction='mean''s divisor, from the labels and weights alone (as on one array): the row
    weights of counted rows, else their count (every row for soft labels).  Not from the merged
    terms: a gradient that waited on every row's logits would keep all of them in memory."""
    p, o = q.p, q.options
    acc = p.acc_dtype
    eps = p.label_smoothing
    n_rows = float(numpy.prod(p.row_shape))
    if p.soft_label:
        if q.weight is None:
            return da.asarray(numpy.asarray(n_rows, acc))
        soft, weight = q.soft.astype(acc), q.weight.astype(acc)
        labelled = da.where(soft == 0, 0, soft * weight).sum()
        return (1 - eps) * labelled + eps * n_rows * weight.sum() / p.K if eps else labelled
    counted = q.label != p.ignore_index
    if q.weight is None:
        return counted.sum().astype(acc)
    weight = q.weight.astype(acc).rechunk(-1)
    rows = da.blockwise(_hard_row_weight, q.rows, q.label, q.rows, weight, ('v',), o, None, concatenate=True,
                        dtype=acc)
    return rows.sum()


@_quiet
def _hard_row_weight(label, weight, o):
    """(1 - eps) weight[label] + eps mean(weight) for counted in-range labels, else 0."""
    xp = _xp(weight)
    label = xp.asarray(label)
    V = weight.shape[0]
    counted = (label != o.ignore_index) & (label >= 0) & (label < V)
    w = weight[xp.where(counted, label, 0)]
    if o.label_smoothing:
        w = (1 - o.label_smoothing) * w + o.label_smoothing * weight.sum() / V
    return xp.where(counted, w, 0)


def _row_factor(q, loss_grad):
    """loss_grad per row (*rows) (a 'mean''s scalar divided by the divisor)."""
    p = q.p
    acc = p.acc_dtype
    if q.reduction == 'none':
        if loss_grad is None:
            return da.ones(p.row_shape, dtype=acc, chunks=q.row_chunks)
        loss_grad = loss_grad if isinstance(loss_grad, da.Array) else da.asarray(loss_grad)
        p.check_row_array(loss_grad, 'loss_grad')
        return loss_grad.reshape(p.row_shape).astype(acc).rechunk(q.row_chunks)
    if loss_grad is not None:
        loss_grad = loss_grad if isinstance(loss_grad, da.Array) else numpy.asarray(loss_grad)
        _api.check_scalar_loss_grad(loss_grad, q.reduction)
    scalar = da.asarray(numpy.asarray(1.0 if loss_grad is None else loss_grad, dtype=acc))
    if q.reduction == 'mean':
        scalar = _mean(scalar, _divisor(q))
    return da.broadcast_to(scalar, p.row_shape, chunks=q.row_chunks)


def _gradient(q, terms, g):
    o, r, p = q.options, q.rows, q.p
    grad = da.blockwise(_gradient_chunk, r + ('z',), q.x, r + ('z',), terms, ('t',) + r, g, r,
                        *q.class_args(), o, None, q.V, None, p.dtype, None, 'forward' if q.use_softmax else 'probs',
                        None, concatenate=True, dtype=p.dtype)
    return da.moveaxis(grad, -1, p.axis)


# ---------------------------------------------------------------- public functions

def forward(logits, label, soft_label=False, ignore_index=-100, axis=-1, *, weight=None, label_smoothing=0.0,
            z_loss=0.0, softcap=None, reduction='none', use_softmax=True):
    """``(loss, lse)`` as lazy Dask arrays (see :func:`cupy_sce.forward`; ``lse`` is None with
    ``use_softmax=False``)."""
    q = _Graph(logits, label, soft_label, ignore_index, axis, weight, label_smoothing, z_loss, softcap, reduction,
               use_softmax=use_softmax)
    q.check_float_mix()
    terms = _merged_terms(q)
    return _loss(q, terms), (da.expand_dims(terms[_LSE], q.p.axis) if q.use_softmax else None)


def cross_entropy(input, label, weight=None, ignore_index=-100, reduction='mean', soft_label=False, axis=-1,
                  use_softmax=True, label_smoothing=0.0, name=None, *, z_loss=0.0, softcap=None):
    """Paddle's ``cross_entropy`` on a Dask array (see :func:`cupy_sce.cross_entropy`)."""
    q = _Graph(input, label, soft_label, ignore_index, axis, weight, label_smoothing, z_loss, softcap, reduction,
               'input', use_softmax)
    q.check_float_mix()
    loss = _loss(q, _merged_terms(q))
    if q.reduction != 'none' or q.p.soft_label or numpy.ndim(label) == len(q.p.shape):
        return loss
    return da.squeeze(loss, q.p.axis)


def forward_backward(logits, label, loss_grad=None, soft_label=False, ignore_index=-100, axis=-1, *, weight=None,
                     label_smoothing=0.0, z_loss=0.0, softcap=None, reduction='none', use_softmax=True):
    """``(loss, logits_grad)`` as lazy Dask arrays from one merge (see :func:`cupy_sce.forward_backward`)."""
    q = _Graph(logits, label, soft_label, ignore_index, axis, weight, label_smoothing, z_loss, softcap, reduction,
               use_softmax=use_softmax)
    q.check_float_mix(('loss_grad', loss_grad))
    terms = _merged_terms(q)
    return _loss(q, terms), _gradient(q, terms, _row_factor(q, loss_grad))


def backward(loss_grad, logits, lse, label, soft_label=False, ignore_index=-100, axis=-1, *, weight=None,
             label_smoothing=0.0, z_loss=0.0, softcap=None, reduction='none', use_softmax=True):
    """The gradient from the ``lse`` that :func:`forward` returned, as a lazy Dask array (see
    :func:`cupy_sce.backward`; with ``use_softmax=False`` the gradient w.r.t. the probabilities,
    ``lse`` unused)."""
    q = _Graph(logits, label, soft_label, ignore_index, axis, weight, label_smoothing, z_loss, softcap, reduction,
               use_softmax=use_softmax)
    q.check_float_mix(('loss_grad', loss_grad), ('lse', lse))
    if not q.use_softmax:
        return _gradient(q, _merged_terms(q), _row_factor(q, loss_grad))
    p = q.p
    if lse is None:
        raise ValueError('lse is required (from forward) unless use_softmax=False')
    lse = lse if isinstance(lse, da.Array) else da.asarray(lse)
    p.check_row_array(lse, 'lse')
    lse = lse.reshape(p.row_shape).astype(p.acc_dtype).rechunk(q.row_chunks)
    terms = _merged_terms(q, lse)
    return _gradient(q, terms, _row_factor(q, loss_grad))
