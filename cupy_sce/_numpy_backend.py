"""NumPy backend: the CPU implementation and the readable mirror of the CUDA kernels.

Every function takes a checked ``_Problem`` ``p`` (see ``_api``): ``p.x`` is a
C-contiguous ``(outer, K, inner)`` array and a *row* is one ``(outer, inner)``
position.  The steps are the kernels' steps, with the kernels' names:

1. ``row_max``            -- max over the class axis (NaN propagates)
2. ``lse``                -- ``row_max + log(sum(exp(x - row_max)))``
3. ``gather_label_logit`` -- ``x[label]`` with ``ignore_index`` and the range check
4. loss                   -- ``lse - x[label]`` (hard) or ``sum_k label_k * (lse - x_k)`` (soft)
5. gradient               -- ``(softmax - onehot(label)) * loss_grad`` (hard) or
                             ``(softmax * sum_k(label_k) - label) * loss_grad`` (soft)

Speed: rows are processed in blocks sized to stay in L2, on a thread pool
(NumPy releases the GIL inside ufuncs), with in-place ufuncs writing into
per-thread scratch or straight into the output.  When K is tiny a row-wise
reduction is all overhead, so such blocks are transposed to ``(1, K, rows)``
and reduced across K contiguous vectors -- the layout the strided
(``inner > 1``) case already has.  There is no loop over rows in Python and
no N*K temporary: extra memory is O(threads x block).
"""
import concurrent.futures
import os
import threading

import numpy

# Elements of one block: 2 float32 blocks of this size (input copy + work) stay in a 1 MiB L2.
BLOCK_ELEMENTS = 1 << 16
# Contiguous rows with at most this many classes are transposed (see module docstring).
SMALL_K = 64

_local = threading.local()
_pool = None
_pool_lock = threading.Lock()
_num_threads = None


def _default_num_threads():
    env = os.environ.get('CUPY_SCE_NUM_THREADS')
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def get_num_threads():
    """Threads the NumPy backend uses (``CUPY_SCE_NUM_THREADS`` or the usable cores)."""
    return _num_threads or _default_num_threads()


def set_num_threads(n):
    """Set the NumPy backend's thread count (``None`` restores the default)."""
    global _num_threads, _pool
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError('num_threads must be a positive int or None, got {!r}'.format(n))
    with _pool_lock:
        _num_threads = n
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None


def _executor():
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(get_num_threads(),
                                                          thread_name_prefix='cupy_sce')
        return _pool


def _scratch(slot, shape, dtype):
    """A per-thread reusable buffer: no allocation (and no page faults) per block."""
    cache = getattr(_local, 'cache', None)
    if cache is None:
        cache = _local.cache = {}
    size = 1
    for n in shape:
        size *= n
    buf = cache.get(slot)
    if buf is None or buf.dtype != dtype or buf.size < size:
        buf = cache[slot] = numpy.empty(max(size, 1), dtype)
    return buf[:size].reshape(shape)


class _Block:
    """One tile of rows: ``x`` in the compute dtype laid out as ``(ob, K, ib)``.

    ``transposed`` tiles (tiny K, contiguous rows) hold ``rows`` rows as
    ``(1, K, rows)``; ``rows()``/``full()`` read and ``put_rows()``/
    ``put_full()`` write the caller's ``(outer, inner)`` and
    ``(outer, K, inner)`` arrays in either layout.
    """

    def __init__(self, p, o0, o1, i0, i1, transposed):
        self.p, self.o0, self.o1, self.i0, self.i1 = p, o0, o1, i0, i1
        self.transposed = transposed
        self.x = self.full(p.x, 'x')

    def full(self, arr, slot):
        view = arr[self.o0:self.o1, :, self.i0:self.i1]
        acc = self.p.acc_dtype
        if self.transposed:
            tile = _scratch(slot, (1, view.shape[1], view.shape[0]), acc)
            numpy.copyto(tile[0], view[:, :, 0].T)
            return tile
        if view.dtype != acc:
            tile = _scratch(slot, view.shape, acc)
            numpy.copyto(tile, view)
            return tile
        return view

    def rows(self, arr):
        view = arr[self.o0:self.o1, self.i0:self.i1]
        return view.reshape(1, 1, -1) if self.transposed else view[:, None, :]

    def put_rows(self, out, value):
        view = out[self.o0:self.o1, self.i0:self.i1]
        numpy.copyto(view, value.reshape(view.shape))

    def work(self, out, slot):
        """A buffer for a full-size result: ``out``'s own tile when it can be written directly."""
        if out is not None and not self.transposed and out.dtype == self.p.acc_dtype:
            tile = out[self.o0:self.o1, :, self.i0:self.i1]
            # In place (out is the logits): the steps still need x after the first write.
            if not numpy.may_share_memory(tile, self.x):
                return tile
        return _scratch(slot, self.x.shape, self.p.acc_dtype)

    def put_full(self, out, work):
        view = out[self.o0:self.o1, :, self.i0:self.i1]
        if self.transposed:
            numpy.copyto(view[:, :, 0], work[0].T)
        elif not numpy.may_share_memory(view, work):
            numpy.copyto(view, work)


def _blocks(p):
    """Tiles covering all rows: whole rows, about BLOCK_ELEMENTS elements each."""
    K = max(p.K, 1)
    if p.outer * p.inner == 0:
        return []
    if p.inner == 1:
        rows = max(1, BLOCK_ELEMENTS // K)
        transposed = p.K <= SMALL_K
        return [(o0, min(o0 + rows, p.outer), 0, 1, transposed) for o0 in range(0, p.outer, rows)]
    slab = K * p.inner
    if slab <= BLOCK_ELEMENTS:
        outers = BLOCK_ELEMENTS // slab
        return [(o0, min(o0 + outers, p.outer), 0, p.inner, False)
                for o0 in range(0, p.outer, outers)]
    inners = max(1, BLOCK_ELEMENTS // K)
    return [(o, o + 1, i0, min(i0 + inners, p.inner), False)
            for o in range(p.outer) for i0 in range(0, p.inner, inners)]


def _for_each_block(p, body):
    """Run ``body(block)`` over every tile (in parallel) and return the first bad row or None."""
    tiles = _blocks(p)

    def run(tile):
        with numpy.errstate(all='ignore'):
            return body(_Block(p, *tile))

    if len(tiles) <= 1 or get_num_threads() == 1:
        results = [run(t) for t in tiles]
    else:
        results = list(_executor().map(run, tiles))
    bad = [r for r in results if r is not None]
    return min(bad) if bad else None


# --------------------------------------------------------------------------
# steps (each works on one tile; the kernels have a device function per step)
# --------------------------------------------------------------------------

def _row_max(x):
    """Step 1: max over the class axis; NaN propagates as in the kernels' nan_max."""
    return x.max(axis=1, keepdims=True)


def _lse(x, row_max, exp_shifted):
    """Step 2: log-sum-exp as ``(shift, log_sum_exp)``; lse = shift + log_sum_exp.

    Leaves ``exp(x - shift)`` in ``exp_shifted``.  The two parts are kept
    apart because ``log_sum_exp + (shift - x_k)`` is exact where ``lse - x_k``
    would first round lse (e.g. 1e4 in float32 has an ulp of 1e-3).  A row
    that is all -inf has shift 0 and lse -inf, as in the kernels' online
    merge, which never forms -inf - -inf.
    """
    shift = numpy.where(row_max == -numpy.inf, 0, row_max)
    numpy.subtract(x, shift, out=exp_shifted)
    numpy.exp(exp_shifted, out=exp_shifted)
    sum_exp = exp_shifted.sum(axis=1, keepdims=True)
    return shift, numpy.log(sum_exp), sum_exp


def _gather_label_logit(x, label, K, ignore_index):
    """Step 3: the label's logit and the row masks ``ignored`` and ``bad``.

    Reads only in-range positions: an ignored or out-of-range label reads
    class 0 (its value is never used).
    """
    ignored = label == ignore_index
    bad = ~ignored & ((label < 0) | (label >= K))
    safe_label = numpy.where(ignored | bad, 0, label)
    picked = numpy.take_along_axis(x, safe_label[:, None, :].astype(numpy.intp), axis=1)
    return picked, ignored[:, None, :], bad[:, None, :]


def _first_bad_row(b, bad):
    """Canonical row index (o * inner + i) of the first out-of-range label in the tile."""
    if not bad.any():
        return None
    flat = numpy.flatnonzero(bad.reshape(-1))[0]
    if b.transposed:
        o, i = b.o0 + flat, 0
    else:
        ib = b.i1 - b.i0
        o, i = b.o0 + flat // ib, b.i0 + flat % ib
    return int(o * b.p.inner + i)


def _hard_loss(shift, log_sum_exp, picked, ignored, bad):
    """Step 4 (hard): ``lse - x[label]``; 0 for ignored rows, NaN for unchecked bad labels."""
    loss = log_sum_exp + (shift - picked)
    loss[ignored] = 0
    loss[bad] = numpy.nan
    return loss


def _soft_loss(x, shift, log_sum_exp, soft, scratch):
    """Step 4 (soft): ``sum_k label_k * (lse - x_k)``; a zero label contributes 0 even at x_k = -inf."""
    numpy.subtract(shift, x, out=scratch)
    scratch += log_sum_exp
    numpy.multiply(scratch, soft, out=scratch)
    scratch[soft == 0] = 0
    return scratch.sum(axis=1, keepdims=True)


def _gradient(b, prob, label_term, loss_grad, grad):
    """Step 5 in place on ``prob``: ``(prob * row_scale - target) * loss_grad``.

    ``label_term`` is ``(label, ignored, bad)`` for hard labels or the soft
    label tile.  For hard labels the true class gets ``prob - 1`` computed in
    the compute dtype before any rounding to float16.
    """
    p = b.p
    g = numpy.ones((1, 1, 1), p.acc_dtype) if loss_grad is None else b.rows(loss_grad)
    if p.soft_label:
        soft = label_term
        # d/dx_k sum_j l_j (lse - x_j) = softmax_k * sum_j(l_j) - l_k
        numpy.multiply(prob, soft.sum(axis=1, keepdims=True) * g, out=grad)
        grad -= soft * g
        return
    label, ignored, bad = label_term
    numpy.multiply(prob, g, out=grad)
    hot = numpy.where(ignored | bad, 0, label[:, None, :]).astype(numpy.intp)
    # d/dx_k (lse - x_label) = softmax_k - [k == label]
    numpy.put_along_axis(grad, hot, numpy.take_along_axis(grad, hot, axis=1) - g, axis=1)
    if ignored.any():
        numpy.copyto(grad, 0, where=ignored)
    if bad.any():
        numpy.copyto(grad, numpy.nan, where=bad)


def _labels(b):
    """The tile's labels: a soft ``(ob, K, ib)`` tile, or hard ``(ob, ib)`` integers."""
    if b.p.soft_label:
        return b.full(b.p.label, 'soft')
    return b.rows(b.p.label)[:, 0, :]


def _hard_rows(b, label):
    picked, ignored, bad = _gather_label_logit(b.x, label, b.p.K, b.p.ignore_index)
    bad_row = _first_bad_row(b, bad) if b.p.check_labels else None
    return picked, ignored, bad, bad_row


# --------------------------------------------------------------------------
# backend interface (same names as _cupy_backend.CupyBackend)
# --------------------------------------------------------------------------

def row_max(p):
    out = numpy.empty((p.outer, p.inner), p.acc_dtype)

    def body(b):
        b.put_rows(out, _row_max(b.x))
    _for_each_block(p, body)
    return out


def logsumexp(p):
    out = numpy.empty((p.outer, p.inner), p.acc_dtype)

    def body(b):
        shift, log_sum_exp, _ = _lse(b.x, _row_max(b.x), _scratch('exp', b.x.shape, p.acc_dtype))
        b.put_rows(out, shift + log_sum_exp)
    _for_each_block(p, body)
    return out


def gather_label_logit(p):
    """Returns ``(picked, bad_row)``: the label logits (0 where ignored) and the first bad row."""
    out = numpy.empty((p.outer, p.inner), p.acc_dtype)

    def body(b):
        picked, ignored, bad, bad_row = _hard_rows(b, _labels(b))
        picked = numpy.where(ignored | bad, 0, picked)
        b.put_rows(out, picked)
        return bad_row
    return out, _for_each_block(p, body)


def forward_out(p, loss, lse, softmax):
    """Loss and lse (and the softmax when ``softmax`` is given) into the given buffers."""
    def body(b):
        label = _labels(b)
        exp_shifted = b.work(softmax, 'exp')
        shift, log_sum_exp, sum_exp = _lse(b.x, _row_max(b.x), exp_shifted)
        bad_row = None
        if p.soft_label:
            row_loss = _soft_loss(b.x, shift, log_sum_exp, label,
                                  _scratch('tmp', b.x.shape, p.acc_dtype))
        else:
            picked, ignored, bad, bad_row = _hard_rows(b, label)
            row_loss = _hard_loss(shift, log_sum_exp, picked, ignored, bad)
        b.put_rows(loss, row_loss)
        b.put_rows(lse, shift + log_sum_exp)
        if softmax is not None:
            exp_shifted *= 1 / sum_exp
            b.put_full(softmax, exp_shifted)
        return bad_row
    return _for_each_block(p, body)


def backward_out(p, loss_grad, lse, softmax, grad):
    """Gradient from ``softmax`` (Paddle's grad op) or recomputed from ``p.x`` and ``lse``.

    ``grad`` may be ``p.x`` itself (in place): each tile is read before it is written.
    """
    def body(b):
        label = _labels(b)
        work = b.work(grad, 'grad')
        if softmax is not None:
            numpy.copyto(work, b.x)  # here p.x holds the softmax
        else:
            numpy.subtract(b.x, b.rows(lse), out=work)
            numpy.exp(work, out=work)
        bad_row = None
        if p.soft_label:
            label_term = label
        else:
            ignored = label == p.ignore_index
            bad = ~ignored & ((label < 0) | (label >= p.K))
            bad_row = _first_bad_row(b, bad) if p.check_labels else None
            label_term = (label, ignored[:, None, :], bad[:, None, :])
        _gradient(b, work, label_term, loss_grad, work)
        b.put_full(grad, work)
        return bad_row
    return _for_each_block(p, body)


def forward_backward_out(p, loss_grad, loss, grad):
    """Loss and gradient from one read of the logits; ``grad`` may be ``p.x`` (in place)."""
    def body(b):
        label = _labels(b)
        work = b.work(grad, 'grad')
        shift, log_sum_exp, sum_exp = _lse(b.x, _row_max(b.x), work)
        bad_row = None
        if p.soft_label:
            row_loss = _soft_loss(b.x, shift, log_sum_exp, label,
                                  _scratch('tmp', b.x.shape, p.acc_dtype))
            label_term = label
        else:
            picked, ignored, bad, bad_row = _hard_rows(b, label)
            row_loss = _hard_loss(shift, log_sum_exp, picked, ignored, bad)
            label_term = (label, ignored, bad)
        b.put_rows(loss, row_loss)
        work *= 1 / sum_exp
        _gradient(b, work, label_term, loss_grad, work)
        b.put_full(grad, work)
        return bad_row
    return _for_each_block(p, body)
