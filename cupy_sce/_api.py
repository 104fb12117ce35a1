"""Public API: argument checking, canonical (outer, K, inner) views, dispatch.

This module is the only place arguments are checked.  Every public function
turns its inputs into a :class:`_Problem` -- the logits viewed as a C-contiguous
``(outer, K, inner)`` array around ``axis``, labels as ``(outer, inner)``
integers or ``(outer, K, inner)`` floats -- allocates the outputs, and hands
both to a backend's ``*_out`` function.  Backends trust what they are given.

The two backends expose the same functions with the same names
(``row_max``, ``logsumexp``, ``gather_label_logit``, ``forward_out``,
``backward_out``, ``forward_backward_out``); see ``_numpy_backend`` and
``_cupy_backend``.
"""
import contextlib
import operator
import threading

import numpy

try:  # CuPy is optional: without it every call runs on the NumPy backend.
    import cupy
except ImportError:  # pragma: no cover - exercised on machines without CuPy
    cupy = None

from cupy_sce import _dtypes, _kernels, _numpy_backend, _output_cache, _probabilities, _split
from cupy_sce._numpy_backend import _quiet  # NaN and inf are valid values: no RuntimeWarnings

_state = threading.local()
_INT64_MIN, _INT64_MAX = int(numpy.iinfo(numpy.int64).min), int(numpy.iinfo(numpy.int64).max)


def get_array_module(*arrays):
    """``cupy.get_array_module`` when CuPy imports, else ``numpy``."""
    if cupy is not None:
        return cupy.get_array_module(*arrays)
    return numpy


def compute_dtype(dtype):
    """The dtype arithmetic happens in: float32 for float16, bfloat16 and float32, else float64."""
    return numpy.dtype(numpy.float64 if numpy.dtype(dtype) == numpy.float64 else numpy.float32)


# --------------------------------------------------------------------------
# options that are not part of the (fixed) Paddle signatures
# --------------------------------------------------------------------------

@contextlib.contextmanager
def label_check(enabled):
    """Turn the hard-label range check on or off inside a ``with`` block.

    On a GPU the check costs one 8-byte device-to-host copy (and so a host
    synchronisation) per call.  Code that must not synchronise (CUDA graphs,
    asynchronous pipelines) can disable it; an out-of-range label then makes
    that row's loss and gradient NaN instead of raising.  No out-of-bounds
    read happens either way.  The setting is per thread.
    """
    previous = getattr(_state, 'check_labels', True)
    _state.check_labels = bool(enabled)
    try:
        yield
    finally:
        _state.check_labels = previous


def _check_labels_enabled():
    return getattr(_state, 'check_labels', True)


@contextlib.contextmanager
def use_backend(backend):
    """Route every call in this thread to ``backend`` (testing hook).

    ``cupy_sce.testing.harness`` uses it to run the CuPy backend's host logic
    and CUDA kernels on the CPU with NumPy arrays.
    """
    previous = getattr(_state, 'backend', None)
    _state.backend = backend
    try:
        yield backend
    finally:
        _state.backend = previous


_cupy_backend_instance = None


def _backend_for(xp):
    forced = getattr(_state, 'backend', None)
    if forced is not None:
        return forced
    if xp is numpy:
        return _numpy_backend
    global _cupy_backend_instance
    if _cupy_backend_instance is None:
        from cupy_sce import _cupy_backend
        _cupy_backend_instance = _cupy_backend.CupyBackend(_cupy_backend.CupyRuntime())
    return _cupy_backend_instance


# --------------------------------------------------------------------------
# argument checking
# --------------------------------------------------------------------------

def _as_arrays(names_and_values):
    """Find the array module of the array arguments; mixing numpy and cupy is an error."""
    kinds = {}
    for name, value in names_and_values:
        if value is None:
            continue
        if isinstance(value, numpy.ndarray):
            kinds.setdefault('numpy', name)
        elif cupy is not None and isinstance(value, cupy.ndarray):
            kinds.setdefault('cupy', name)
    if len(kinds) > 1:
        raise TypeError(
            'cannot mix numpy and cupy arrays in one call: {} is a numpy.ndarray but {} is a '
            'cupy.ndarray'.format(kinds['numpy'], kinds['cupy']))
    xp = cupy if 'cupy' in kinds else numpy
    # bfloat16 beside float16/float64 arrays is an error (a number or a 0-d array is a scalar)
    _dtypes.check_float_mix([(name, value) for name, value in names_and_values
                             if isinstance(value, xp.ndarray) and value.ndim])
    out = []
    for name, value in names_and_values:
        if value is not None and not isinstance(value, xp.ndarray):
            try:
                value = xp.asarray(value)
            except Exception as exc:
                raise TypeError('{} must be an array, got {!r}'.format(name, type(value))) from exc
        out.append(value)
    return xp, out


def _check_bool(name, value):
    if isinstance(value, (bool, numpy.bool_)):
        return bool(value)
    raise TypeError('{} must be a bool, got {!r}'.format(name, value))


def _check_real(name, value):
    if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, (int, float, numpy.integer, numpy.floating)):
        raise TypeError('{} must be a real number, got {!r}'.format(name, value))
    return float(value)


def _check_int(name, value):
    if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, (int, numpy.integer)):
        raise TypeError('{} must be an int, got {!r}'.format(name, value))
    return operator.index(value)


def _normalize_axis(axis, ndim):
    axis = _check_int('axis', axis)
    if not -ndim <= axis < ndim:
        raise ValueError('axis {} is out of range for logits of rank {} (valid: [{}, {}])'.format(
            axis, ndim, -ndim, ndim - 1))
    return axis % ndim


def _check_logits(logits, name='logits'):
    if not _dtypes.is_compute_float(logits.dtype):
        raise TypeError('{} must be {}, got {}'.format(name, _dtypes.FLOAT_NAMES, logits.dtype))
    if logits.ndim == 0:
        raise ValueError('{} must have rank >= 1, got a 0-d array'.format(name))


class _Problem:
    """Logits, labels and options in the canonical layout the backends use.

    ``x`` is a C-contiguous ``(outer, K, inner)`` array (a view when the
    logits already are contiguous, else a copy); ``label`` is ``(outer,
    inner)`` int32/int64 for hard labels or ``(outer, K, inner)`` float in
    the compute dtype for soft labels.
    """

    def __init__(self, xp, logits, label, soft_label, ignore_index, axis, label_name='label', weight=None,
                 label_smoothing=0.0, z_loss=0.0, softcap=None, logits_name='logits', shape=None, dtype=None):
        # logits=None with shape and dtype: a problem of labels only (the fused linear cross entropy's,
        # whose logits exist a chunk at a time); x is then None
        if logits is not None:
            _check_logits(logits, logits_name)
            shape, dtype = logits.shape, logits.dtype
        self.xp = xp
        self.logits = logits
        self.shape = shape = tuple(shape)
        self.dtype = numpy.dtype(dtype)
        self.acc_dtype = compute_dtype(self.dtype)
        self.loss_dtype = self.dtype  # Paddle's rule; the loss_dtype keyword may change it
        self.soft_label = _check_bool('soft_label', soft_label)
        self.ignore_index = _check_int('ignore_index', ignore_index)
        if not _INT64_MIN <= self.ignore_index <= _INT64_MAX:
            raise ValueError('ignore_index {} does not fit in int64'.format(self.ignore_index))
        self.axis = _normalize_axis(axis, len(shape))
        self.outer = _prod(shape[:self.axis])
        self.K = shape[self.axis]
        self.inner = _prod(shape[self.axis + 1:])
        self.loss_shape = shape[:self.axis] + (1,) + shape[self.axis + 1:]
        self.row_shape = shape[:self.axis] + shape[self.axis + 1:]
        if self.K == 0 and self.outer * self.inner:
            raise ValueError('logits shape {} has 0 classes along axis {}: a row needs at least one '
                             'class'.format(shape, self.axis))
        self.x = None if logits is None else xp.ascontiguousarray(logits).reshape(self.outer, self.K, self.inner)
        self.label_user = label
        self.label = None if label is None else self._canonical_label(label, label_name)
        self.check_labels = _check_labels_enabled()
        self._set_features(weight, label_smoothing, z_loss, softcap)

    def _set_features(self, weight, label_smoothing, z_loss, softcap):
        """The loss family's options, checked; ``features`` is their bit set (_kernels.F_*)."""
        if weight is None and softcap is None and type(label_smoothing) is float and type(z_loss) is float \
                and label_smoothing == 0.0 and z_loss == 0.0:
            # the defaults (every Paddle-op call): nothing to convert or range-check
            self.label_smoothing = self.z_loss = 0.0
            self.softcap = self.weight = self.weight_sum = None
            self.features = 0
            return
        def acc(value):
            with numpy.errstate(over='ignore'):  # a float32 overflow is reported below, not warned
                return self.acc_dtype.type(value)
        self.label_smoothing = _check_real('label_smoothing', label_smoothing)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError('label_smoothing must be in [0, 1), got {!r}'.format(label_smoothing))
        # the kernels take these in the compute dtype: a value finite in float64 may not be in float32
        self.z_loss = _check_real('z_loss', z_loss)
        if not (0.0 <= self.z_loss and numpy.isfinite(acc(self.z_loss))):
            raise ValueError('z_loss must be a finite number >= 0 (in {}), got {!r}'.format(self.acc_dtype, z_loss))
        self.softcap = None if softcap is None else _check_real('softcap', softcap)
        if self.softcap is not None and not (acc(self.softcap) > 0 and numpy.isfinite(acc(self.softcap))):
            raise ValueError('softcap must be a finite number > 0 (in {}) or None, got {!r}'.format(
                self.acc_dtype, softcap))
        self.weight = self.weight_sum = None
        if weight is not None:
            if not _dtypes.is_float(weight.dtype):
                raise TypeError('weight must be a floating array, got {}'.format(weight.dtype))
            if weight.shape != (self.K,):
                raise ValueError('weight must be a 1-D array of length K={} (the classes along axis {}), got '
                                 'shape {}'.format(self.K, self.axis, weight.shape))
            self.weight = self.xp.ascontiguousarray(weight, dtype=self.acc_dtype)
            self.weight_sum = self.weight.sum(keepdims=True)
        self.features = _kernels.feature_bits(self.weight is not None, self.label_smoothing != 0,
                                              self.z_loss != 0, self.softcap is not None)

    def check_label(self, label, name='label', logits_name='logits'):
        """The label's dtype and shape: floating and the logits' shape (soft), or integer and the
        loss shape or the row shape (hard).  Also for labels this class does not convert (a Dask
        array, a rank's global indices)."""
        if self.soft_label:
            if not _dtypes.is_float(label.dtype):
                raise TypeError('{} must be a floating array when soft_label=True, got {}'.format(
                    name, label.dtype))
            if label.shape != self.shape:
                raise ValueError('{} shape {} must equal {} shape {} when soft_label=True'.format(
                    name, label.shape, logits_name, self.shape))
            return
        if label.dtype.kind not in 'iu':
            raise TypeError(
                '{} must be an integer array when soft_label=False, got {} (pass soft_label=True for '
                'probabilities)'.format(name, label.dtype))
        if label.shape not in (self.loss_shape, self.row_shape):
            raise ValueError(
                '{} shape {} does not match {} shape {} with axis={}: expected {} or {}'.format(
                    name, label.shape, logits_name, self.shape, self.axis, self.loss_shape, self.row_shape))

    def _canonical_label(self, label, name):
        xp = self.xp
        self.check_label(label, name)
        if self.soft_label:
            return xp.ascontiguousarray(label, dtype=self.acc_dtype).reshape(
                self.outer, self.K, self.inner)
        # int32 and int64 are the two label types the kernels are instantiated for; uint32 and
        # uint64 need the wider type to keep their values.
        label_dtype = numpy.int32 if label.dtype.itemsize < 4 or label.dtype == numpy.int32 \
            else numpy.int64
        if label.dtype == numpy.uint64:
            # a value above int64's range becomes an out-of-range label (not wrapped to a valid
            # one): the backends' label check reports its row like any bad label's (no extra host
            # sync), and IndexError shows the caller's value; unchecked, its row is NaN
            too_big = label > numpy.iinfo(numpy.int64).max
            out_of_range = self.K + 1 if self.ignore_index == self.K else self.K
            label = xp.where(too_big, out_of_range, label.astype(numpy.int64))
        return xp.ascontiguousarray(label, dtype=label_dtype).reshape(self.outer, self.inner)

    def row_array(self, value, name, dtype):
        """``value`` of the loss shape (or that shape without the axis) as (outer, inner)."""
        self.check_row_array(value, name)
        return self.xp.ascontiguousarray(value, dtype=dtype).reshape(self.outer, self.inner)

    def check_row_array(self, value, name):
        """A per-row array (loss_grad, lse): floating, the loss shape or that shape without the axis."""
        if not _dtypes.is_float(value.dtype):
            raise TypeError('{} must be a floating array, got {}'.format(name, value.dtype))
        if value.shape not in (self.loss_shape, self.row_shape):
            raise ValueError('{} shape {} must be {} (or {}) for logits of shape {} with axis={}'.format(
                name, value.shape, self.loss_shape, self.row_shape, self.shape, self.axis))

    def loss_grad_rows(self, loss_grad):
        """``loss_grad`` as (outer, inner) in the compute dtype; None (ones) stays None."""
        return None if loss_grad is None else self.row_array(loss_grad, 'loss_grad', self.acc_dtype)

    def hard_row_weight(self, index):
        """Hard labels: the row weight ``sum_k t_k weight_k`` for label ``index`` (in range; any
        shape), ``(1 - eps) weight[label] + eps * mean(weight)``, as the kernels' ``row_terms``."""
        weight = self.xp.take(self.weight, index)
        eps = self.label_smoothing
        return (1 - eps) * weight + eps * (self.weight_sum[0] / self.K) if eps else weight

    def ignored(self, kept=False):
        """Hard labels: the mask of ignored rows ((outer, inner)); with ``kept`` of the others.
        ``ignore_index`` is compared as a scalar of the labels' type where that type holds it (a
        scalar argument: no device copy); where it does not, no label can equal it."""
        info = numpy.iinfo(self.label.dtype)
        if info.min <= self.ignore_index <= info.max:
            value = self.label.dtype.type(self.ignore_index)
            return self.label != value if kept else self.label == value
        return (self.xp.ones if kept else self.xp.zeros)(self.label.shape, dtype=bool)

    def reject_bad_labels_before_overwrite(self, backend, out):
        """When the gradient goes into the caller's memory (``out`` given: the logits or another
        buffer), raise for a bad hard label before anything is written (one extra look at the
        labels, only with the check on): a bad label must leave every array the caller holds as
        it was."""
        if out is not None and self.check_labels and not self.soft_label:
            self.check(backend.first_bad_label(self))

    def raise_bad_label(self, row):
        """Raise the IndexError for the label of canonical row ``row``."""
        label = self.label_user
        position = numpy.unravel_index(row, self.row_shape) if self.row_shape else ()
        if label.shape == self.loss_shape:
            position = position[:self.axis] + (0,) + position[self.axis:]
        value = int(label[position]) if position else int(label.reshape(()))
        raise IndexError(
            'label value {} at position {} is out of range for K={} classes (valid: [0, {}) or '
            'ignore_index={})'.format(value, tuple(int(p) for p in position), self.K, self.K,
                                      self.ignore_index))

    def check(self, bad_row):
        if bad_row is not None:
            self.raise_bad_label(bad_row)

    def empty(self, shape, dtype):
        """An output array (the NumPy backend's large ones from recycled memory: _output_cache)."""
        if self.xp is numpy:
            return _output_cache.empty(shape, dtype)
        return self.xp.empty(shape, dtype=dtype)


def _prod(values):
    result = 1
    for v in values:
        result *= int(v)
    return result


# --------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------

_REDUCTIONS = ('none', 'mean', 'sum')


def _check_reduction(reduction):
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError("reduction must be 'none', 'mean' or 'sum', got {!r}".format(reduction))
    return reduction


def _check_loss_dtype(p, loss_dtype):
    """``loss_dtype=None`` keeps Paddle's rule (the logits' dtype); else a float dtype that the
    loss (computed in the compute dtype) is rounded to once."""
    if loss_dtype is None:
        return
    try:
        dtype = _dtypes.as_dtype(loss_dtype)
    except TypeError as exc:
        raise TypeError('loss_dtype must be None or a float dtype, got {!r} ({})'.format(loss_dtype, exc)) from exc
    if not _dtypes.is_compute_float(dtype):
        raise TypeError('loss_dtype must be None, {}, got {!r}'.format(_dtypes.FLOAT_NAMES, loss_dtype))
    p.loss_dtype = dtype


def _loss_rows(p):
    """A buffer for the per-row losses: the kernels write them in the compute dtype."""
    return p.empty((p.outer, p.inner), p.acc_dtype)


@_quiet
def _normalizer(p):
    """The divisor of reduction='mean', from the labels alone (so that a fused backward knows it
    before the first row): the sum of the row weights of non-ignored rows with ``weight``, else
    the count of non-ignored rows (hard labels) or of all rows (soft labels).  A 0-d array in the
    compute dtype, on the problem's device (no host synchronisation)."""
    xp, acc = p.xp, p.acc_dtype
    eps = p.label_smoothing
    n = p.outer * p.inner
    if n == 0:
        return xp.zeros((), acc)
    if p.soft_label:
        if p.weight is None:
            return xp.asarray(n, dtype=acc)
        # sum over rows of sum_k t_k w_k, t = (1 - eps) label + eps / K; a class no label
        # touches adds 0 even at weight NaN or inf
        labelled = xp.where(p.label == 0, 0, p.label * p.weight[:, None]).sum(dtype=acc)
        return (1 - eps) * labelled + eps * n * p.weight_sum[0] / p.K if eps else labelled
    counted = p.ignored(kept=True)
    if p.weight is None:
        return counted.sum(dtype=acc)
    # a bad label reads class 0 here (its loss is NaN, or it raises)
    in_range = counted & (p.label >= 0) & (p.label < p.K)
    return xp.where(counted, p.hard_row_weight(xp.where(in_range, p.label, 0)), 0).sum(dtype=acc)


def _per_mean_divisor(p, value):
    """``value / D`` for reduction='mean', 0 where D is 0 (every row ignored, or weights summing
    to 0; ``_split.divided``, as Dask and the vocabulary-parallel loss divide).  D is computed
    once per call: the loss and the gradient of a fused call share it."""
    divisor = getattr(p, 'mean_divisor', None)
    if divisor is None:
        divisor = p.mean_divisor = _normalizer(p)
    return _split.divided(p.xp, value, divisor)


def _shaped_loss(p, loss, reduction):
    """The loss of forward/forward_backward: per row in the loss shape, or the 0-d reduction."""
    return loss.reshape(p.loss_shape) if reduction == 'none' else loss


def _reduce(p, rows, reduction):
    """Per-row losses (compute dtype) as the user's output: ``p.loss_dtype`` (the logits' dtype
    unless loss_dtype= says otherwise), reduced to 0-d for 'mean' (0 when the normalizer is 0) and 'sum'.  Sums run in a fixed order (same bits on
    every run and thread count)."""
    if reduction == 'none' and p.loss_dtype == p.acc_dtype:
        return rows  # nothing to cast or sum (and no error state to enter: a small call's time)
    return _reduce_quietly(p, rows, reduction)


@_quiet
def _reduce_quietly(p, rows, reduction):
    xp = p.xp
    if reduction == 'none':
        return rows.astype(p.loss_dtype, copy=False)
    total = rows.sum(dtype=p.acc_dtype)
    if reduction == 'mean':
        total = _per_mean_divisor(p, total)
    return xp.asarray(total).astype(p.loss_dtype, copy=False)


def _row_loss_grad(p, loss_grad, reduction):
    """``loss_grad`` as one value per row (compute dtype; None = ones without reduction).  With
    'mean' or 'sum' it is a scalar (None = 1) spread over the rows, divided by the normalizer
    for 'mean' (0 when that is 0)."""
    if reduction == 'none':
        return p.loss_grad_rows(loss_grad)
    return _reduced_loss_grad(p, loss_grad, reduction)


def check_scalar_loss_grad(loss_grad, reduction):
    """With reduction 'mean' or 'sum', ``loss_grad`` (an array, or anything with ``ndim`` and
    ``dtype``) is a real scalar."""
    if loss_grad.ndim != 0:
        raise ValueError("loss_grad must be a scalar (a number or a 0-d array) with reduction={!r}, got "
                         "shape {}".format(reduction, loss_grad.shape))
    if loss_grad.dtype.kind not in 'fiu' and not _dtypes.is_float(loss_grad.dtype):
        raise TypeError('loss_grad must be a real number, got dtype {}'.format(loss_grad.dtype))


@_quiet
def _reduced_loss_grad(p, loss_grad, reduction):
    xp, acc = p.xp, p.acc_dtype
    if loss_grad is None:
        g = xp.ones((), acc)
    else:
        check_scalar_loss_grad(loss_grad, reduction)
        g = loss_grad.astype(acc, copy=False)
    if reduction == 'mean':
        g = _per_mean_divisor(p, g)
    return xp.ascontiguousarray(xp.broadcast_to(g, (p.outer, p.inner)))


def softmax_with_cross_entropy(logits, label, soft_label=False, ignore_index=-100,
                               numeric_stable_mode=True, return_softmax=False, axis=-1):
    """Paddle's ``softmax_with_cross_entropy`` on numpy or cupy arrays.

    Returns ``loss`` (logits' shape with ``shape[axis] == 1``, logits' dtype),
    or ``(loss, softmax)`` when ``return_softmax``.  ``numeric_stable_mode``
    is accepted for compatibility; every path is stable.
    """
    xp, (logits, label) = _as_arrays([('logits', logits), ('label', label)])
    _check_bool('numeric_stable_mode', numeric_stable_mode)
    return_softmax = _check_bool('return_softmax', return_softmax)
    p = _Problem(xp, logits, label, soft_label, ignore_index, axis)
    loss = _loss_rows(p)
    softmax = p.empty((p.outer, p.K, p.inner), p.dtype) if return_softmax else None
    p.check(_backend_for(xp).forward_out(p, loss, None, softmax))
    loss = _reduce(p, loss, 'none').reshape(p.loss_shape)
    if return_softmax:
        return loss, softmax.reshape(p.shape)
    return loss


def _family(xp, logits, label, soft_label, ignore_index, axis, weight, label_smoothing, z_loss, softcap,
            logits_name='logits'):
    """The problem of a loss-family call (checked, canonical)."""
    return _Problem(xp, logits, label, soft_label, ignore_index, axis, weight=weight,
                    label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, logits_name=logits_name)


def _check_use_softmax(use_softmax, p):
    """After the problem's own checks: z_loss and softcap act on logits."""
    use_softmax = _check_bool('use_softmax', use_softmax)
    if not use_softmax and (p.z_loss != 0 or p.softcap is not None):
        raise ValueError('z_loss and softcap need use_softmax=True (they act on logits), got z_loss={!r}, '
                         'softcap={!r}'.format(p.z_loss, p.softcap))
    return use_softmax


def forward(logits, label, soft_label=False, ignore_index=-100, axis=-1, *, weight=None, label_smoothing=0.0,
            z_loss=0.0, softcap=None, reduction='none', use_softmax=True, loss_dtype=None):
    """Memory-light forward: ``(loss, lse)``; no N*K softmax is kept.

    ``lse`` (log-sum-exp of each row's logits, soft-capped when ``softcap`` is
    set) has the shape of the unreduced loss and the compute dtype (float32 for
    float16 logits, so the backward pass keeps precision).  The features and
    ``reduction`` are those of :func:`cross_entropy`; the z-loss alone is
    ``z_loss * lse**2``.  ``use_softmax=False``: ``logits`` hold probabilities
    and ``lse`` is None.  ``loss_dtype`` (None: the logits' dtype) is the loss's dtype.
    """
    xp, (logits, label, weight) = _as_arrays([('logits', logits), ('label', label), ('weight', weight)])
    reduction = _check_reduction(reduction)
    p = _family(xp, logits, label, soft_label, ignore_index, axis, weight, label_smoothing, z_loss, softcap)
    use_softmax = _check_use_softmax(use_softmax, p)
    _check_loss_dtype(p, loss_dtype)
    loss = _loss_rows(p)
    if not use_softmax:
        p.check(_probabilities.forward_out(p, loss))
        return _shaped_loss(p, _reduce(p, loss, reduction), reduction), None
    lse = p.empty((p.outer, p.inner), p.acc_dtype)
    p.check(_backend_for(xp).forward_out(p, loss, lse, None))
    return _shaped_loss(p, _reduce(p, loss, reduction), reduction), lse.reshape(p.loss_shape)


def cross_entropy(input, label, weight=None, ignore_index=-100, reduction='mean', soft_label=False, axis=-1,
                  use_softmax=True, label_smoothing=0.0, name=None, *, z_loss=0.0, softcap=None, loss_dtype=None):
    """Paddle's ``paddle.nn.functional.cross_entropy`` on numpy or cupy arrays, plus ``z_loss``
    (PaLM: each row's loss gains ``z_loss * lse**2``) and ``softcap`` (Gemma 2: the logits become
    ``softcap * tanh(logits / softcap)`` first).

    ``reduction='none'`` returns the label's shape for hard labels (with or without the size-1
    class axis, as given) and the input's shape with ``shape[axis] == 1`` for soft labels;
    'mean' and 'sum' return a 0-d array of the input's dtype.  ``use_softmax=False``: ``input``
    holds probabilities (see README, Semantics).  ``name`` is accepted for Paddle compatibility
    and ignored.  ``loss_dtype`` (None: the input's dtype) is the loss's dtype: float32 keeps the
    digits a float16 loss rounds away.
    """
    xp, (input, label, weight) = _as_arrays([('input', input), ('label', label), ('weight', weight)])
    reduction = _check_reduction(reduction)
    p = _family(xp, input, label, soft_label, ignore_index, axis, weight, label_smoothing, z_loss, softcap, 'input')
    use_softmax = _check_use_softmax(use_softmax, p)
    _check_loss_dtype(p, loss_dtype)
    loss = _loss_rows(p)
    if use_softmax:
        p.check(_backend_for(xp).forward_out(p, loss, None, None))
    else:
        p.check(_probabilities.forward_out(p, loss))
    loss = _reduce(p, loss, reduction)
    if reduction != 'none':
        return loss
    return loss.reshape(p.loss_shape if p.soft_label or label.ndim == input.ndim else p.row_shape)


def _check_out(p, out, name):
    if out.shape != p.shape or out.dtype != p.dtype:
        raise ValueError('{} must have the logits\' shape {} and dtype {}, got {} {}'.format(
            name, p.shape, p.dtype, out.shape, out.dtype))
    if not out.flags.c_contiguous and out is not p.logits:
        raise ValueError('{} must be C-contiguous (or be the logits array itself)'.format(name))


def _same_view(a, b):
    """Whether ``a`` and ``b`` view the same elements in the same layout (``x[:]``, ``x.view()``)."""
    if a.shape != b.shape or a.strides != b.strides or a.dtype != b.dtype:
        return False
    ptr = (lambda v: v.data.ptr) if cupy is not None and isinstance(a, cupy.ndarray) else (lambda v: v.ctypes.data)
    return ptr(a) == ptr(b)


def _grad_target(p, out, name):
    """(buffer the backend writes as (outer, K, inner), array returned, whether to copy back)."""
    if out is None:
        grad = p.empty((p.outer, p.K, p.inner), p.dtype)
        return grad, grad.reshape(p.shape), False
    if out is not p.logits and p.xp.may_share_memory(out, p.logits):
        if not _same_view(out, p.logits):
            raise ValueError('{} overlaps the logits without being the same view of them: pass the logits '
                             'array itself to write the gradient in place'.format(name))
        out_view, out = out, p.logits  # a view of the logits: in place, like the logits themselves
        _check_out(p, out, name)
        return p.x, out_view, not out.flags.c_contiguous
    _check_out(p, out, name)
    if out is p.logits:
        # In place: the backend reads each logit before it writes that element's gradient, so it
        # can write into p.x.  p.x is a view of the logits when they are C-contiguous and a copy
        # (written back afterwards) when they are not.
        return p.x, out, not out.flags.c_contiguous
    return out.reshape(p.outer, p.K, p.inner), out, False


def _finish_grad(p, grad, target, copy_back):
    if copy_back:
        target[...] = grad.reshape(p.shape)
    return target


def backward(loss_grad, logits, lse, label, soft_label=False, ignore_index=-100, axis=-1, out=None, *,
             weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None, reduction='none', use_softmax=True):
    """Gradient w.r.t. the logits, recomputing the softmax from ``logits`` and ``lse``.

    ``out=logits`` writes the gradient into the logits buffer (the logits are
    destroyed); ``loss_grad=None`` means ones.  With ``reduction`` 'mean' or
    'sum', ``loss_grad`` is the scalar gradient of the reduced loss.  The
    features must be those the forward that produced ``lse`` used.
    ``use_softmax=False``: the gradient w.r.t. the probabilities in ``logits``
    (``lse`` is not used and may be None).
    """
    xp, (loss_grad, logits, lse, label, out, weight) = _as_arrays(
        [('loss_grad', loss_grad), ('logits', logits), ('lse', lse), ('label', label), ('out', out),
         ('weight', weight)])
    reduction = _check_reduction(reduction)
    p = _family(xp, logits, label, soft_label, ignore_index, axis, weight, label_smoothing, z_loss, softcap)
    use_softmax = _check_use_softmax(use_softmax, p)
    if use_softmax and lse is None:
        raise ValueError('lse is required (from forward) unless use_softmax=False')
    lse2 = p.row_array(lse, 'lse', p.acc_dtype) if use_softmax else None
    row_grad = _row_loss_grad(p, loss_grad, reduction)
    if out is not None:
        # the backends read these while they write out: no overlap (the logits: see _grad_target)
        for other_name, other in (('lse', lse), ('label', label), ('loss_grad', loss_grad), ('weight', weight)):
            if other is not None and xp.may_share_memory(out, other):
                raise ValueError('out overlaps {}: pass a separate buffer'.format(other_name))
    grad, target, copy_back = _grad_target(p, out, 'out')
    backend = _backend_for(xp)
    p.reject_bad_labels_before_overwrite(backend, out)
    if use_softmax:
        p.check(backend.backward_out(p, row_grad, lse2, None, grad))
    else:
        p.check(_probabilities.forward_backward_out(p, row_grad, None, grad))
    return _finish_grad(p, grad, target, copy_back)


def softmax_with_cross_entropy_grad(loss_grad, softmax, label, soft_label=False, ignore_index=-100,
                                    axis=-1):
    """Paddle's grad op: ``(Softmax, Label, Loss@GRAD) -> Logits@GRAD``.

    For soft labels this returns the exact derivative
    ``softmax * sum_k(label_k) - label`` (Paddle returns ``softmax - label``,
    which is wrong when a label row does not sum to 1).
    """
    xp, (loss_grad, softmax, label) = _as_arrays(
        [('loss_grad', loss_grad), ('softmax', softmax), ('label', label)])
    _check_logits(softmax, 'softmax')
    p = _Problem(xp, softmax, label, soft_label, ignore_index, axis)
    grad = p.empty((p.outer, p.K, p.inner), p.dtype)
    p.check(_backend_for(xp).backward_out(p, p.loss_grad_rows(loss_grad), None, p.x, grad))
    return grad.reshape(p.shape)


def forward_backward(logits, label, loss_grad=None, soft_label=False, ignore_index=-100, axis=-1,
                     inplace=False, *, weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
                     reduction='none', use_softmax=True, loss_dtype=None):
    """Loss and gradient from one pass: ``(loss, logits_grad)``.

    ``inplace=True`` writes the gradient into ``logits`` (destroying them) and
    returns that array as ``logits_grad``.  Features, ``reduction``, ``use_softmax`` and
    ``loss_dtype`` as in :func:`forward` / :func:`backward`.
    """
    xp, (logits, label, loss_grad, weight) = _as_arrays(
        [('logits', logits), ('label', label), ('loss_grad', loss_grad), ('weight', weight)])
    inplace = _check_bool('inplace', inplace)
    reduction = _check_reduction(reduction)
    p = _family(xp, logits, label, soft_label, ignore_index, axis, weight, label_smoothing, z_loss, softcap)
    use_softmax = _check_use_softmax(use_softmax, p)
    _check_loss_dtype(p, loss_dtype)
    row_grad = _row_loss_grad(p, loss_grad, reduction)
    grad, target, copy_back = _grad_target(p, logits if inplace else None, 'logits')
    backend = _backend_for(xp)
    p.reject_bad_labels_before_overwrite(backend, logits if inplace else None)
    loss = _loss_rows(p)
    if use_softmax:
        p.check(backend.forward_backward_out(p, row_grad, loss, grad))
    else:
        p.check(_probabilities.forward_backward_out(p, row_grad, loss, grad))
    return _shaped_loss(p, _reduce(p, loss, reduction), reduction), _finish_grad(p, grad, target, copy_back)


# --------------------------------------------------------------------------
# building blocks, each usable on its own
# --------------------------------------------------------------------------

def row_max(logits, axis=-1):
    """Maximum along ``axis`` (NaN propagates), keepdims, in the compute dtype."""
    xp, (logits,) = _as_arrays([('logits', logits)])
    p = _Problem(xp, logits, None, False, -100, axis)
    return _backend_for(xp).row_max(p).reshape(p.loss_shape)


def logsumexp(logits, axis=-1):
    """``log(sum(exp(logits)))`` along ``axis``, keepdims, in the compute dtype."""
    xp, (logits,) = _as_arrays([('logits', logits)])
    p = _Problem(xp, logits, None, False, -100, axis)
    return _backend_for(xp).logsumexp(p).reshape(p.loss_shape)


def gather_label_logit(logits, label, ignore_index=-100, axis=-1):
    """The logit of each row's label (0 where the label is ``ignore_index``), range-checked."""
    xp, (logits, label) = _as_arrays([('logits', logits), ('label', label)])
    p = _Problem(xp, logits, label, False, ignore_index, axis)
    picked, bad_row = _backend_for(xp).gather_label_logit(p)
    p.check(bad_row)
    return picked.reshape(p.loss_shape)
