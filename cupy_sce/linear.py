"""Fused linear + cross entropy: the loss of ``hidden @ weight.T (+ bias)`` and its gradients
without ever holding the N x V logits.

The rows (tokens) are taken ``chunk_size`` at a time: the chunk's logits go into one reused
buffer (``numpy.matmul`` / ``cupy.matmul``, i.e. BLAS / cuBLAS), the fused in-place
``forward_backward`` turns them into their own gradient, and that gradient is multiplied back:
``grad_hidden[chunk] = dlogits @ weight``, ``grad_weight += dlogits.T @ hidden[chunk]``,
``grad_bias += dlogits.sum(0)``.  Extra memory is one chunk of logits (plus, for float16 and
bfloat16 on the CPU, float32 copies of the weight and a chunk: NumPy has no 16-bit BLAS), never N x V.  The
divisor of ``reduction='mean'`` comes from the labels before the first chunk, so one pass
suffices, and the label range is checked once, before any chunk runs.

Precision: the logits of a chunk are computed in the compute dtype's matmul (float32 for 16-bit
inputs on the CPU; cuBLAS's 16-bit matmuls accumulate in float32 on a GPU) and stored in the
inputs' dtype, as an unfused ``hidden @ weight.T`` would be; ``grad_weight`` and ``grad_bias``
accumulate over the chunks in the compute dtype (float32 for 16-bit inputs) and are rounded to the inputs' dtype
once at the end.  Results are deterministic for a given chunk size.
"""
import numpy

from cupy_sce import _api, _dtypes

# chunk_size=None: the largest number of rows whose logits take at most this many bytes (and at
# least CHUNK_MIN_ROWS rows).  At N = 8192, H = 2048, V = 32000 float32 (786-row chunks) the step
# took 1.01x the unfused composition's time with 104 MiB of extra memory (1/9.6 of the logits);
# 64 MiB chunks (and 2048-row vocabulary blocks) took 1.15x: each chunk adds a pass over
# grad_weight (docs/performance.md).
CHUNK_BYTES = 96 * 2 ** 20
CHUNK_MIN_ROWS = 64
# On the CPU grad_weight accumulates a chunk's dlogits.T @ hidden this many vocabulary rows at a
# time (a reused (VOCAB_BLOCK, H) buffer: 8 MiB at H = 2048 float32); on a GPU one cuBLAS product
# per chunk adds into it (_gemm_accumulate).
VOCAB_BLOCK = 1024


def default_chunk_size(n_rows, vocab, itemsize):
    """The chunk_size=None rule: rows whose logits fit CHUNK_BYTES, at least CHUNK_MIN_ROWS, at most
    all rows."""
    return max(1, min(n_rows, max(CHUNK_MIN_ROWS, CHUNK_BYTES // max(1, vocab * itemsize))))


class _Linear:
    """The checked problem: flattened hidden (N, H), weight (V, H), bias (V) or None, and the
    label problem (``_api._Problem`` without logits: labels, family options, reductions)."""

    def __init__(self, hidden, weight, label, bias, ignore_index, label_smoothing, z_loss, softcap,
                 class_weight, chunk_size, reduction):
        xp, (hidden, weight, label, bias, class_weight) = _api._as_arrays(
            [('hidden', hidden), ('weight', weight), ('label', label), ('bias', bias),
             ('class_weight', class_weight)])
        for name, value in (('hidden', hidden), ('weight', weight)):
            if not _dtypes.is_compute_float(value.dtype):
                raise TypeError('{} must be {}, got {}'.format(name, _dtypes.FLOAT_NAMES, value.dtype))
        if hidden.ndim < 1:
            raise ValueError('hidden must have rank >= 1 (..., H), got a 0-d array')
        if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError('weight must be (V, H) with H = hidden.shape[-1] = {}, got shape {}'.format(
                hidden.shape[-1], weight.shape))
        if weight.dtype != hidden.dtype:
            raise TypeError('weight dtype {} differs from hidden dtype {}'.format(weight.dtype, hidden.dtype))
        V = weight.shape[0]
        if bias is not None and (bias.shape != (V,) or bias.dtype != hidden.dtype):
            raise ValueError('bias must be a ({},) array of {}, got {} {}'.format(V, hidden.dtype, bias.shape,
                                                                                 bias.dtype))
        if label.shape != hidden.shape[:-1]:
            raise ValueError('label shape {} must be hidden.shape[:-1] = {}'.format(label.shape, hidden.shape[:-1]))
        self.reduction = _api._check_reduction(reduction)
        self.xp = xp
        self.hidden = hidden.reshape(-1, hidden.shape[-1])
        self.weight, self.bias = weight, bias
        # the label problem over N rows of V classes (no logits are ever materialised whole)
        self.p = _api._Problem(xp, None, label.reshape(-1, 1), False, ignore_index, -1, weight=class_weight,
                               label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                               shape=(self.hidden.shape[0], V), dtype=hidden.dtype)
        self.label_shape = label.shape
        if chunk_size is None:
            chunk_size = default_chunk_size(self.hidden.shape[0], V, hidden.dtype.itemsize)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, numpy.integer)) or chunk_size < 1:
            raise ValueError('chunk_size must be a positive int or None, got {!r}'.format(chunk_size))
        self.chunk_size = int(chunk_size)
        self.class_weight = class_weight
        self.options = dict(ignore_index=self.p.ignore_index, weight=self.p.weight,
                            label_smoothing=self.p.label_smoothing, z_loss=self.p.z_loss, softcap=self.p.softcap)
        # NumPy has no float16 or bfloat16 BLAS: its matmuls run in float32 copies
        self.matmul_dtype = self.p.acc_dtype if (xp is numpy and hidden.dtype.itemsize == 2) else hidden.dtype

    def check_labels_once(self):
        """The label range, checked before any chunk runs (then the chunks skip it)."""
        p = self.p
        if not p.check_labels:
            return
        xp = self.xp
        bad = (p.ignored(kept=True) & ((p.label < 0) | (p.label >= p.K))).ravel()
        if bool(bad.any()):
            row = int(xp.argmax(bad))
            position = tuple(int(i) for i in numpy.unravel_index(row, self.label_shape))
            raise IndexError('label value {} at position {} is out of range for V={} classes (valid: [0, {}) or '
                             'ignore_index={})'.format(int(p.label.ravel()[row]), position, p.K, p.K,
                                                       p.ignore_index))

    def chunks(self):
        N = self.hidden.shape[0]
        for start in range(0, N, self.chunk_size):
            yield start, min(N, start + self.chunk_size)

    def logits_into(self, buffer, start, stop, weight_t):
        """The chunk's logits, hidden[start:stop] @ weight.T (+ bias), into ``buffer``."""
        rows = buffer[:stop - start]
        h = self.hidden[start:stop]
        if self.matmul_dtype != h.dtype:
            rows[...] = self.xp.matmul(h.astype(self.matmul_dtype), weight_t)
        else:
            self.xp.matmul(h, weight_t, out=rows)
        if self.bias is not None:
            rows += self.bias
        return rows


def _prepare(hidden, weight, label, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, class_weight,
             chunk_size):
    lin = _Linear(hidden, weight, label, bias, ignore_index, label_smoothing, z_loss, softcap, class_weight,
                  chunk_size, reduction)
    lin.check_labels_once()
    weight_t = lin.weight.astype(lin.matmul_dtype, copy=False).T
    buffer = lin.xp.empty((min(lin.chunk_size, max(1, lin.hidden.shape[0])), lin.weight.shape[0]), lin.weight.dtype)
    return lin, weight_t, buffer


def linear_cross_entropy(hidden, weight, label, bias=None, *, ignore_index=-100, reduction='mean',
                         label_smoothing=0.0, z_loss=0.0, softcap=None, class_weight=None, chunk_size=None):
    """The cross-entropy loss of ``hidden @ weight.T (+ bias)`` against hard labels, in chunks of
    rows: ``hidden`` (..., H), ``weight`` (V, H), ``label`` (...) integers, ``bias`` (V).  The
    options are those of :func:`cupy_sce.cross_entropy` (``class_weight`` is its ``weight``);
    ``reduction='none'`` returns the label's shape."""
    lin, weight_t, buffer = _prepare(hidden, weight, label, bias, ignore_index, reduction, label_smoothing,
                                     z_loss, softcap, class_weight, chunk_size)
    p = lin.p
    rows = p.xp.empty((lin.hidden.shape[0], 1), p.acc_dtype)
    with _api.label_check(False):
        for start, stop in lin.chunks():
            logits = lin.logits_into(buffer, start, stop, weight_t)
            rows[start:stop] = _api.forward(logits, p.label[start:stop], loss_dtype=p.acc_dtype, **lin.options)[0]
    return _finish_loss(lin, rows)


def linear_cross_entropy_forward_backward(hidden, weight, label, bias=None, loss_grad=None, *, ignore_index=-100,
                                          reduction='mean', label_smoothing=0.0, z_loss=0.0, softcap=None,
                                          class_weight=None, chunk_size=None):
    """``(loss, grad_hidden, grad_weight, grad_bias)`` of :func:`linear_cross_entropy` in one pass
    over the chunks (``grad_bias`` is None without a bias).  ``loss_grad``: as in
    :func:`cupy_sce.forward_backward` (a scalar for 'mean'/'sum', the loss's shape for 'none';
    None means ones)."""
    lin, weight_t, buffer = _prepare(hidden, weight, label, bias, ignore_index, reduction, label_smoothing,
                                     z_loss, softcap, class_weight, chunk_size)
    p, xp = lin.p, lin.xp
    acc = p.acc_dtype
    if loss_grad is not None:
        # on the hidden states' array module: a Python number beside cupy arrays becomes a cupy scalar
        _, (_, loss_grad) = _api._as_arrays([('hidden', lin.hidden), ('loss_grad', loss_grad)])
        if reduction == 'none':
            loss_grad = loss_grad.reshape(-1, 1) if loss_grad.shape == lin.label_shape else loss_grad
    row_grad = _api._row_loss_grad(p, loss_grad, lin.reduction)  # (N, 1) per row: 1/D for a mean
    N, H = lin.hidden.shape
    rows = xp.empty((N, 1), acc)
    grad_hidden = xp.empty((N, H), lin.hidden.dtype)
    grad_weight = xp.zeros(lin.weight.shape, acc)
    grad_bias = None if lin.bias is None else xp.zeros(lin.weight.shape[:1], acc)
    weight_for_grad = weight_t.T  # the weight in the matmul dtype, cast once in _prepare
    direct = lin.matmul_dtype == lin.hidden.dtype == acc  # the matmuls can write their results in place
    with _api.label_check(False):
        for start, stop in lin.chunks():
            logits = lin.logits_into(buffer, start, stop, weight_t)
            g = None if row_grad is None else row_grad[start:stop]
            loss, dlogits = _api.forward_backward(logits, p.label[start:stop], g, inplace=True, loss_dtype=acc,
                                                  **lin.options)
            rows[start:stop] = loss
            d = dlogits.astype(lin.matmul_dtype, copy=False)
            h = lin.hidden[start:stop].astype(lin.matmul_dtype, copy=False)
            if lin.matmul_dtype == lin.hidden.dtype:
                xp.matmul(d, weight_for_grad, out=grad_hidden[start:stop])
            else:
                grad_hidden[start:stop] = xp.matmul(d, weight_for_grad)
            if xp is not numpy:  # one cuBLAS product per chunk, accumulated in grad_weight's dtype
                _gemm_accumulate(grad_weight, d, h, start > 0)
            elif direct and start == 0:
                xp.matmul(d.T, h, out=grad_weight)  # the first chunk's product is the sum so far
            else:
                _accumulate_product(xp, grad_weight, d, h, lin.matmul_dtype)
            if grad_bias is not None:
                grad_bias += d.sum(axis=0, dtype=acc)
    dtype = lin.hidden.dtype
    grad_hidden = grad_hidden.reshape(lin.label_shape + (H,))
    return (_finish_loss(lin, rows), grad_hidden, grad_weight.astype(dtype, copy=False),
            None if grad_bias is None else grad_bias.astype(dtype, copy=False))


# cuBLAS's enums (library_types.h, cublas_api.h): data types, compute types, operations.
_CUDA_DATA_TYPE = {'float16': 2, 'bfloat16': 14, 'float32': 0, 'float64': 1}
_CUBLAS_COMPUTE_32F, _CUBLAS_COMPUTE_64F = 68, 70
_CUBLAS_OP_N, _CUBLAS_OP_T, _CUBLAS_GEMM_DEFAULT = 0, 1, -1


def _gemm_accumulate(total, d, h, accumulate):
    """``total (+)= d.T @ h`` on a GPU in one ``cublasGemmEx``: ``total`` (V, H) in the compute dtype
    (float32 for 16-bit inputs, whose products cuBLAS accumulates in float32 and adds into
    ``total`` without rounding them to 16 bits), ``d`` (n, V) and ``h`` (n, H) C-contiguous in
    the inputs' dtype; ``accumulate=False`` overwrites.  (CuPy's matmul can neither add into its
    output nor write float32 from 16-bit inputs: a product per vocabulary block and an add made
    the fused step slower than the unfused composition.)  Column-major, ``total`` is the (H, V)
    matrix ``h^T d``: A = h as (H, n), B = d as (V, n) transposed."""
    import cupy
    from cupy_backends.cuda.libs import cublas
    V, H = total.shape
    n = d.shape[0]
    if total.size == 0 or n == 0:  # nothing to add (cuBLAS refuses leading dimensions of 0)
        return
    d, h = cupy.ascontiguousarray(d), cupy.ascontiguousarray(h)
    double = total.dtype == numpy.float64
    scalars = numpy.array([1.0, 1.0 if accumulate else 0.0], numpy.float64 if double else numpy.float32)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    in_type = _CUDA_DATA_TYPE[h.dtype.name]
    cublas.gemmEx(handle, _CUBLAS_OP_N, _CUBLAS_OP_T, H, V, n,
                  scalars.ctypes.data, h.data.ptr, in_type, H,
                  d.data.ptr, in_type, V,
                  scalars.ctypes.data + scalars.itemsize, total.data.ptr, _CUDA_DATA_TYPE[total.dtype.name], H,
                  _CUBLAS_COMPUTE_64F if double else _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT)


def _accumulate_product(xp, total, d, h, dtype):
    """``total += d.T @ h`` (NumPy) a block of VOCAB_BLOCK rows of ``total`` at a time, each product into
    one reused buffer: the whole (V, H) product would be a second grad_weight-sized temporary (250
    MiB at V = 32000, H = 2048) and its page faults on every chunk.  (BLAS can accumulate into C,
    but NumPy's and CuPy's matmul overwrite ``out``.)"""
    V, H = total.shape
    block = xp.empty((min(VOCAB_BLOCK, V), H), dtype)
    for v0 in range(0, V, VOCAB_BLOCK):
        v1 = min(V, v0 + VOCAB_BLOCK)
        product = block[:v1 - v0]
        xp.matmul(d[:, v0:v1].T, h, out=product)
        total[v0:v1] += product


def _finish_loss(lin, rows):
    loss = _api._reduce(lin.p, rows, lin.reduction)
    return loss.reshape(lin.label_shape) if lin.reduction == 'none' else loss
