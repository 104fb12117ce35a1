"""Vocabulary-parallel cross entropy: each rank holds a slice of the classes of every row.

    from mpi4py import MPI
    from cupy_sce.distributed import vocab_parallel_forward_backward
    # rank r holds classes [vocab_start, vocab_start + K_r) of every row: local_logits (..., K_r)
    loss, local_grad = vocab_parallel_forward_backward(local_logits, label, vocab_start, MPI.COMM_WORLD)

This is Megatron-LM's ``vocab_parallel_cross_entropy`` and Paddle's ``ParallelCrossEntropy``
with the loss family of :func:`cupy_sce.cross_entropy`.  No rank ever holds a full row and the
logits never travel: the forward is two all-reduces over the ranks, one of the per-row maxima
(N values) and one sum that carries every per-row partial at once (the other classes' sum of
``exp(y - max)``, the label's logit, which rank owns the label, and what the features need:
``sum_k y_k`` for label smoothing, the label's class weight, the soft labels' sums), plus two
scalars (the global vocabulary size V and the class weights' sum).  The backward from a stored
``lse`` is one such sum.  Every rank returns the same loss and lse and its own slice of the
gradient.

Communicators (``comm``), one small adapter each that maps the two reductions:

* an ``mpi4py`` communicator (``MPI.COMM_WORLD`` or any other): NumPy arrays, or CuPy arrays
  with a CUDA-aware MPI (the current stream is synchronised before each call);
* a ``cupyx.distributed`` NCCL communicator (``cupyx.distributed.init_process_group``): CuPy arrays;
* a ``torch.distributed`` process group (``torch.distributed.group.WORLD`` or a subgroup, any
  backend: gloo for NumPy arrays, nccl for CuPy arrays).

Semantics are those of :func:`cupy_sce.forward` / :func:`cupy_sce.forward_backward` on the
concatenated logits, with these local forms: ``label`` holds *global* class indices (hard) or
the rank's slice of the soft labels (``soft_label=True``, the local logits' shape); ``weight`` is
the rank's slice of the class weights (length ``K_r``).  Every rank must pass the same labels
(hard), ``ignore_index``, options and reduction.  A label outside ``[0, V)`` is an ``IndexError``
on every rank (each learns it from the same all-reduce, so none is left waiting), unless
``cupy_sce.label_check(False)``, which makes that row's loss and gradient NaN.

Precision: the loss of a hard label is ``log1p`` of the other classes' terms relative to the
label's logit, as on one device (a confident prediction keeps its digits), and the label's
``softmax - 1`` comes from ``expm1``.  Results agree with the single-device functions to rounding,
not bit for bit: the sums are split differently.  The computation here is array arithmetic on the
local slice (NumPy or CuPy), not the fused kernels.
"""
import numpy

from cupy_sce import _api, _dtypes, _split
from cupy_sce._numpy_backend import _quiet

__all__ = ['vocab_parallel_forward', 'vocab_parallel_backward', 'vocab_parallel_forward_backward']

# ---------------------------------------------------------------- communicators

class _MPIComm:
    """mpi4py: ``Allreduce`` into a new buffer (CuPy arrays need a CUDA-aware MPI)."""

    def __init__(self, comm):
        from mpi4py import MPI
        self.comm, self.ops = comm, {'max': MPI.MAX, 'sum': MPI.SUM}

    def allreduce(self, xp, array, op):
        out = xp.empty_like(array)
        if xp is not numpy:  # MPI reads device memory directly: the kernels that wrote it must be done
            xp.cuda.get_current_stream().synchronize()
        self.comm.Allreduce(array, out, op=self.ops[op])
        return out


class _NCCLComm:
    """cupyx.distributed's NCCL communicator, on CuPy's current stream."""

    def __init__(self, comm):
        self.comm = comm

    def allreduce(self, xp, array, op):
        out = xp.empty_like(array)
        self.comm.all_reduce(array, out, op)
        return out


class _TorchComm:
    """A torch.distributed process group: the array is shared with a tensor (from_numpy / DLPack)
    and reduced in place in a copy."""

    def __init__(self, group):
        import torch.distributed
        self.group, self.dist = group, torch.distributed
        self.ops = {'max': torch.distributed.ReduceOp.MAX, 'sum': torch.distributed.ReduceOp.SUM}

    def allreduce(self, xp, array, op):
        import torch
        out = array.copy()
        tensor = torch.from_numpy(out) if xp is numpy else torch.from_dlpack(out)
        self.dist.all_reduce(tensor, op=self.ops[op], group=self.group)
        return out


def _communicator(comm):
    module = type(comm).__module__ or ''
    if module.startswith('mpi4py'):
        return _MPIComm(comm)
    if module.startswith('cupyx.distributed'):
        return _NCCLComm(comm)
    if module.startswith('torch'):
        import torch.distributed
        if isinstance(comm, torch.distributed.ProcessGroup):
            return _TorchComm(comm)
    raise TypeError('comm must be an mpi4py communicator, a cupyx.distributed NCCL communicator or a '
                    'torch.distributed process group, got {!r}'.format(type(comm)))


# ---------------------------------------------------------------- the checked problem of one rank

class _Shard:
    """One rank's slice, checked: ``x`` the local logits as (rows, K_r) in the compute dtype,
    ``label`` (rows,) global indices or ``soft`` (rows, K_r) times ``1 - eps``, ``weight`` (K_r,),
    ``options`` what cupy_sce._split's steps need."""

    def __init__(self, local_logits, label, vocab_start, comm, ignore_index, soft_label, weight,
                 label_smoothing, z_loss, softcap, reduction, axis):
        xp, (local_logits, label, weight) = _api._as_arrays(
            [('local_logits', local_logits), ('label', label), ('weight', weight)])
        self.xp = xp
        self.local_logits = local_logits
        self.comm = _communicator(comm)
        _api._check_logits(local_logits, 'local_logits')
        # the option checks of one device, on the local shape (K_r classes; at least one a rank)
        p = _api._Problem(xp, None, None, soft_label, ignore_index, axis, shape=local_logits.shape,
                          dtype=local_logits.dtype, label_smoothing=label_smoothing, z_loss=z_loss,
                          softcap=softcap, logits_name='local_logits')
        self.p = p
        self.reduction = _api._check_reduction(reduction)
        self.vocab_start = _api._check_int('vocab_start', vocab_start)
        if self.vocab_start < 0:
            raise ValueError('vocab_start must be >= 0, got {}'.format(self.vocab_start))
        acc = p.acc_dtype
        K = p.K
        self.x = xp.ascontiguousarray(xp.moveaxis(local_logits, p.axis, -1)).reshape(-1, K).astype(acc, copy=False)
        self.n_rows = self.x.shape[0]
        self.soft = self.label = None
        p.check_label(label, logits_name='local_logits')
        if p.soft_label:
            self.soft = xp.ascontiguousarray(xp.moveaxis(label, p.axis, -1)).reshape(-1, K).astype(acc)
            if p.label_smoothing:
                self.soft = (1 - p.label_smoothing) * self.soft  # + eps / V once V is known
        else:
            self.label = label.reshape(p.row_shape).astype(numpy.int64).reshape(-1)
        self.weight = None
        if weight is not None:
            if not _dtypes.is_float(weight.dtype):
                raise TypeError('weight must be a floating array, got {}'.format(weight.dtype))
            if weight.shape != (K,):
                raise ValueError('weight must be this rank\'s slice of the class weights, a 1-D array of length '
                                 'K_r={} (the local classes along axis {}), got shape {}'.format(
                                     K, p.axis, weight.shape))
            self.weight = xp.asarray(weight, dtype=acc)
        self.options = _split.Options(p.soft_label, p.ignore_index, p.label_smoothing, p.z_loss, p.softcap,
                                      p.acc_dtype.name, self.weight is not None)

    # -- the all-reduces

    def global_sums(self, columns, scalars):
        """``columns`` (per-row arrays) and ``scalars`` summed over the ranks in one all-reduce."""
        xp = self.xp
        acc = self.p.acc_dtype
        flat = xp.concatenate([xp.asarray(c, dtype=acc).reshape(-1) for c in columns] +
                              [xp.asarray(s, dtype=acc).reshape(1) for s in scalars])
        total = self.comm.allreduce(xp, flat, 'sum')
        n = self.n_rows
        return [total[i * n:(i + 1) * n] for i in range(len(columns))], [total[len(columns) * n + i]
                                                                          for i in range(len(scalars))]

    def check_float_mix(self, name, array):
        """The array API's rule for an array that arrives apart (loss_grad, lse): beside bfloat16
        logits, float32 or bfloat16 only."""
        if array.ndim:
            _dtypes.check_float_mix([('local_logits', self.local_logits), (name, array)])

    def check_labels(self, t):
        """A row whose hard label no rank holds (outside [0, V)) is an IndexError on every rank (all
        of them see the same sums, so none is left waiting in a collective), unless the label check
        is off (then its loss and gradient are NaN)."""
        if t.bad is None or not self.p.check_labels or not bool(t.bad.any()):
            return
        row = int(self.xp.argmax(t.bad))
        position = numpy.unravel_index(row, self.p.row_shape) if self.p.row_shape else ()
        raise IndexError('label value {} at position {} is out of range for V={} classes over all ranks '
                         '(valid: [0, {}) or ignore_index={})'.format(
                             int(self.label[row]), tuple(int(i) for i in position), int(t.V), int(t.V),
                             self.p.ignore_index))


# ---------------------------------------------------------------- the steps (cupy_sce._split)

@_quiet
def _forward_terms(s):
    """Two all-reduces: the row max, then every partial sum at once."""
    xp, o = s.xp, s.options
    y = _split.capped(xp, o, s.x)
    shift = _split.finite_shift(xp, s.comm.allreduce(xp, xp.ascontiguousarray(_split.slice_max(xp, o, y)), 'max'))
    columns, scalars = _split.forward_columns(xp, o, y, shift, s.label, s.vocab_start, s.soft, s.weight)
    sums, scalars = s.global_sums(columns, scalars)
    t = _split.forward_terms(xp, o, shift, sums, scalars, s.label)
    s.check_labels(t)
    return y, t


@_quiet
def _backward_terms(s, lse):
    """One all-reduce: V, the label's owner and logit, the row weights' parts."""
    xp, o = s.xp, s.options
    y = _split.capped(xp, o, s.x)
    columns, scalars = _split.backward_columns(xp, o, y, s.label, s.vocab_start, s.soft, s.weight)
    sums, scalars = s.global_sums(columns, scalars)
    t = _split.backward_terms(xp, o, lse, sums, scalars, s.label)
    s.check_labels(t)
    return y, t


def _reduced(s, t, rows):
    """The user's loss: per row in the loss shape (logits' dtype), or the 0-d 'mean' / 'sum'."""
    xp, p = s.xp, s.p
    if s.reduction == 'none':
        return rows.reshape(p.loss_shape).astype(p.dtype)
    total = rows.sum()
    if s.reduction == 'mean':
        total = _split.divided(xp, total, _mean_divisor(s, t))
    return xp.asarray(total).astype(p.dtype)


def _mean_divisor(s, t):
    """reduction='mean''s divisor, once per call (the loss and the gradient of a fused call share it)."""
    if getattr(t, 'divisor', None) is None:
        t.divisor = _split.counted_weight(s.xp, s.options, t).sum()
    return t.divisor


def _row_grad(s, t, loss_grad):
    """The per-row factor of the gradient, ``loss_grad * w`` (a 'mean''s divided by its divisor)."""
    xp, p = s.xp, s.p
    acc = p.acc_dtype
    if loss_grad is not None:
        _, (loss_grad,) = _api._as_arrays([('loss_grad', loss_grad)])
        s.check_float_mix('loss_grad', loss_grad)
    if s.reduction == 'none':
        g = xp.ones(s.n_rows, acc) if loss_grad is None else p.row_array(loss_grad, 'loss_grad', acc).reshape(-1)
    else:
        if loss_grad is not None:
            _api.check_scalar_loss_grad(loss_grad, s.reduction)
        scalar = xp.asarray(1 if loss_grad is None else loss_grad, dtype=acc)
        if s.reduction == 'mean':
            scalar = _split.divided(xp, scalar, _mean_divisor(s, t))
        g = xp.broadcast_to(scalar, (s.n_rows,))
    return g * t.w if t.w is not None else g


@_quiet
def _gradient(s, y, t, g):
    grad = _split.slice_gradient(s.xp, s.options, s.x, y, t, g, s.label, s.vocab_start, s.soft)
    p = s.p
    return s.xp.moveaxis(grad.reshape(p.row_shape + (p.K,)), -1, p.axis).astype(p.dtype, copy=False)


# ---------------------------------------------------------------- public functions

def vocab_parallel_forward(local_logits, label, vocab_start, comm, ignore_index=-100, *, soft_label=False,
                           weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None, reduction='none',
                           axis=-1):
    """``(loss, lse)`` of the rows whose classes are split over the ranks of ``comm``; this rank
    holds classes ``[vocab_start, vocab_start + local_logits.shape[axis])``.  Two all-reduces.
    ``loss`` and ``lse`` are the same on every rank, in :func:`cupy_sce.forward`'s shapes and
    dtypes.  See the module docstring for ``label``, ``weight`` and ``comm``."""
    s = _Shard(local_logits, label, vocab_start, comm, ignore_index, soft_label, weight, label_smoothing, z_loss,
               softcap, reduction, axis)
    _, t = _forward_terms(s)
    return _reduced(s, t, _split.row_loss(s.xp, s.options, t)), t.lse.reshape(s.p.loss_shape)


def vocab_parallel_forward_backward(local_logits, label, vocab_start, comm, loss_grad=None, ignore_index=-100, *,
                                    soft_label=False, weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
                                    reduction='none', axis=-1):
    """``(loss, local_grad)``: the loss (same on every rank) and this rank's slice of its gradient
    with respect to ``local_logits``, from the same two all-reduces as the forward."""
    s = _Shard(local_logits, label, vocab_start, comm, ignore_index, soft_label, weight, label_smoothing, z_loss,
               softcap, reduction, axis)
    y, t = _forward_terms(s)
    loss = _reduced(s, t, _split.row_loss(s.xp, s.options, t))
    return loss, _gradient(s, y, t, _row_grad(s, t, loss_grad))


def vocab_parallel_backward(loss_grad, local_logits, lse, label, vocab_start, comm, ignore_index=-100, *,
                            soft_label=False, weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
                            reduction='none', axis=-1):
    """This rank's slice of the gradient from the ``lse`` that :func:`vocab_parallel_forward`
    returned (one all-reduce, for V, the label's owner and the row weights).  ``loss_grad=None``
    means ones; with 'mean' or 'sum' it is the reduced loss's scalar gradient."""
    s = _Shard(local_logits, label, vocab_start, comm, ignore_index, soft_label, weight, label_smoothing, z_loss,
               softcap, reduction, axis)
    _, (lse,) = _api._as_arrays([('lse', lse)])
    s.check_float_mix('lse', lse)
    lse_rows = s.p.row_array(lse, 'lse', s.p.acc_dtype).reshape(-1)
    y, t = _backward_terms(s, lse_rows)
    return _gradient(s, y, t, _row_grad(s, t, loss_grad))
