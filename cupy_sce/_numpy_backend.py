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

Speed: rows are processed in tiles of about 1 MiB (BLOCK_ELEMENTS, measured),
one chunk of tiles per thread of a pool (NumPy releases the GIL inside
ufuncs), with in-place ufuncs writing into per-thread scratch or straight into
the output; each tile does its own label step, as each kernel row does.  When K is tiny a row-wise
reduction is all overhead, so such blocks are transposed to ``(1, K, rows)``
and reduced across K contiguous vectors -- the layout the strided
(``inner > 1``) case already has.  There is no loop over rows in Python and
no N*K temporary: extra memory is O(threads x block).
"""
import concurrent.futures
import os
import threading

import numpy

# Elements of one tile (1 MiB of float32).  Measured on 2 cores (1 MiB L2 each): 64K-element
# tiles are dominated by per-call overhead; 256K is within 5% of the best.
BLOCK_ELEMENTS = 1 << 18
# Contiguous rows with at most this many classes are transposed (see module docstring).
SMALL_K = 64

_local = threading.local()
_pool = None
_pool_lock = threading.Lock()
_num_threads = None


def _default_num_threads():
    env = os.environ.get('CUPY_SCE_NUM_THREADS')
    if env:
        if not env.strip().isdigit() or int(env) < 1:
            raise ValueError('CUPY_SCE_NUM_THREADS must be a positive integer, got {!r}'.format(env))
        return int(env)
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

    def work(self, out, slot, alias_ok=False):
        """A buffer for a full-size result: ``out``'s own tile when it can be written directly.

        With ``alias_ok`` the tile may be the logits' own (in place: the caller reads
        each x before writing its result and needs no x afterwards); otherwise a
        tile that overlaps x gets scratch.
        """
        if out is not None and not self.transposed and out.dtype == self.p.acc_dtype:
            tile = out[self.o0:self.o1, :, self.i0:self.i1]
            if alias_ok or not numpy.may_share_memory(tile, self.x):
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
    """Run ``body(block)`` over every tile and return the first non-None result (a bad row).

    Tiles are split statically into one contiguous chunk per thread: one pool
    task per thread, not per tile.
    """
    tiles = _blocks(p)
    n_threads = min(get_num_threads(), len(tiles))

    def run(chunk):
        found = []
        with numpy.errstate(all='ignore'):
            for tile in chunk:
                result = body(_Block(p, *tile))
                if result is not None:
                    found.append(result)
        return min(found) if found else None

    if n_threads <= 1:
        results = [run(tiles)]
    else:
        bounds = [len(tiles) * t // n_threads for t in range(n_threads + 1)]
        results = list(_executor().map(run, [tiles[a:b] for a, b in zip(bounds, bounds[1:])]))
    bad = [r for r in results if r is not None]
    return min(bad) if bad else None


# --------------------------------------------------------------------------
# steps (the kernels have a device function per step)
# --------------------------------------------------------------------------

def _row_max(x):
    """Step 1: max over the class axis; NaN propagates as in the kernels' nan_max."""
    return x.max(axis=1, keepdims=True)


def _row_sum(e):
    """Sum over the class axis.  Contiguous rows use einsum's SIMD sum: measured 2.6x faster
    than NumPy's pairwise sum, relative error <= 2e-6 at K = 128256 (about 2 ulp of the loss).
    Not a BLAS matrix-vector product: OpenBLAS threads every gemv above ~9K elements, and its
    threads inside ours oversubscribed the cores (3-4x slower, measured)."""
    if e.shape[2] == 1 and e.shape[1] > SMALL_K:
        return numpy.einsum('ij->i', e[:, :, 0])[:, None, None]
    return e.sum(axis=1, keepdims=True)


def _exp_shifted(x, exp_out):
    """Step 2 on a tile: ``(shift, sum_exp)``, leaving ``exp(x - shift)`` in ``exp_out``.

    lse = shift + log(sum_exp).  shift is the row max, except that an all -inf
    row is shifted by the lowest finite value instead of -inf, so that
    ``x - shift`` never forms -inf - -inf (the kernels' online merge shifts such
    a row by 0; both give sum_exp 0 and lse -inf).
    """
    row_max = _row_max(x)
    shift = numpy.maximum(row_max, _LOWEST[x.dtype.char], out=row_max)
    numpy.subtract(x, shift, out=exp_out)
    numpy.exp(exp_out, out=exp_out)
    return shift, _row_sum(exp_out)


_LOWEST = {'f': numpy.finfo(numpy.float32).min, 'd': numpy.finfo(numpy.float64).min}


def _quiet(fn):
    """NaN and inf are valid inputs here (they must propagate): no RuntimeWarnings."""
    def wrapper(*args):
        with numpy.errstate(all='ignore'):
            return fn(*args)
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


class _TileLabels:
    """Step 3 on one tile (rows are independent, as in the kernels): the label's logit, the
    ignored / out-of-range masks, and the tile's first bad row.

    Reads only in-range positions: an ignored or out-of-range label reads class
    0 (its value is never used).  ``clean`` (from ``_labels_clean``, once per
    call) says every label is in [0, K) and none equals ``ignore_index``: then
    no masks are needed (``ignored`` and ``bad`` are None).  Contiguous rows use
    flat offsets (take / item assignment), cheaper than *_along_axis on tiles of
    a few long rows.
    """

    def __init__(self, b, clean):
        p = b.p
        label = b.rows(p.label)  # (ob, 1, ib), or (1, 1, rows) in a transposed tile
        self.ignored = self.bad = self.invalid = None
        if not clean:
            ignored = label == p.ignore_index
            bad = ~ignored & ((label < 0) | (label >= p.K))
            self.ignored = ignored if ignored.any() else None
            self.bad = bad if bad.any() else None
            if self.ignored is not None or self.bad is not None:
                self.invalid = ignored | bad
        self.index = label if self.invalid is None else numpy.where(self.invalid, 0, label)
        self.flat = None
        if p.inner == 1 and not b.transposed and b.x.flags.c_contiguous:
            rows = b.o1 - b.o0
            self.flat = _arange(rows) * p.K + self.index.reshape(-1)
            self.picked = b.x.reshape(-1).take(self.flat).reshape(label.shape)
        else:
            self.picked = numpy.take_along_axis(b.x, self.index, axis=1)
        self.bad_row = _first_bad_row(b, self.bad) if p.check_labels and self.bad is not None else None

    def loss(self, shift, log_sum_exp):
        """Step 4 (hard): ``lse - x[label]`` as ``log_sum_exp + (shift - x[label])``, which stays
        exact where lse would first be rounded; 0 when ignored, NaN for an unchecked bad label."""
        loss = log_sum_exp + (shift - self.picked)
        if self.ignored is not None:
            loss[self.ignored] = 0
        if self.bad is not None:
            loss[self.bad] = numpy.nan
        return loss

    def finish_gradient(self, tile, label_prob, g):
        """Step 5's label term on a tile holding ``softmax * g``: ``tile[label] = (softmax[label]
        - 1) * g``, formed in the compute dtype from the label's own probability (no float16
        ``softmax - 1`` cancellation); ignored rows become 0 and unchecked bad rows NaN
        (selected, not multiplied: their logits may be NaN or inf)."""
        value = (label_prob - 1) * g
        if self.flat is not None and tile.flags.c_contiguous:
            tile.reshape(-1)[self.flat] = numpy.broadcast_to(value, self.index.shape).reshape(-1)
        else:
            numpy.put_along_axis(tile, self.index, value, axis=1)
        if self.ignored is not None:
            numpy.copyto(tile, 0, where=self.ignored)
        if self.bad is not None:
            numpy.copyto(tile, numpy.nan, where=self.bad)


def _labels_clean(p):
    """True when every hard label is in [0, K) and none equals ignore_index (two reductions,
    no temporaries): tiles then skip the mask work."""
    if p.soft_label or p.label.size == 0:
        return True
    lo, hi = p.label.min(), p.label.max()
    return bool(0 <= lo and hi < p.K and not lo <= p.ignore_index <= hi)


def _arange(n):
    cache = getattr(_local, 'arange', None)
    if cache is None or cache.size < n:
        cache = _local.arange = numpy.arange(max(n, 1024), dtype=numpy.intp)
    return cache[:n]


def _first_bad_row(b, bad):
    """Canonical row index (o * inner + i) of the tile's first out-of-range label."""
    flat = int(numpy.flatnonzero(bad.reshape(-1))[0])
    if b.transposed:
        return (b.o0 + flat) * b.p.inner
    ib = b.i1 - b.i0
    return (b.o0 + flat // ib) * b.p.inner + b.i0 + flat % ib


def _soft_terms(b, shift, log_sum_exp, prob, loss_grad, grad):
    """Steps 4-5 (soft) on a tile: the loss ``sum_k l_k * (lse - x_k)`` (a zero label adds 0
    even at x_k = -inf) and, into ``grad``, ``(softmax * sum_k(l_k) - l) * loss_grad``."""
    p = b.p
    soft = b.full(p.label, 'soft')
    loss = None
    if shift is not None:
        terms = _scratch('terms', b.x.shape, p.acc_dtype)
        numpy.subtract(shift, b.x, out=terms)
        terms += log_sum_exp
        terms *= soft
        terms[soft == 0] = 0
        loss = terms.sum(axis=1, keepdims=True)
    if grad is not None:
        g = 1 if loss_grad is None else b.rows(loss_grad)
        # d/dx_k sum_j l_j (lse - x_j) = softmax_k * sum_j(l_j) - l_k
        numpy.multiply(prob, soft.sum(axis=1, keepdims=True) * g, out=grad)
        # soft may be a view of the caller's label: never scale it in place
        grad -= numpy.multiply(soft, g, out=_scratch('terms', b.x.shape, p.acc_dtype))
    return loss


# --------------------------------------------------------------------------
# backend interface (same names as _cupy_backend.CupyBackend)
# --------------------------------------------------------------------------

def row_max(p):
    out = numpy.empty((p.outer, p.inner), p.acc_dtype)

    def body(b):
        b.put_rows(out, _row_max(b.x))
    _for_each_block(p, body)
    return out


@_quiet
def logsumexp(p):
    out = numpy.empty((p.outer, p.inner), p.acc_dtype)

    def body(b):
        shift, sum_exp = _exp_shifted(b.x, _scratch('exp', b.x.shape, p.acc_dtype))
        b.put_rows(out, shift + numpy.log(sum_exp))
    _for_each_block(p, body)
    return out


@_quiet
def gather_label_logit(p):
    """Returns ``(picked, bad_row)``: the label logits (0 where ignored or bad) and the first bad row."""
    clean = _labels_clean(p)
    out = numpy.empty((p.outer, p.inner), p.acc_dtype)

    def body(b):
        labels = _TileLabels(b, clean)
        picked = labels.picked if labels.invalid is None else numpy.where(labels.invalid, 0, labels.picked)
        b.put_rows(out, picked)
        return labels.bad_row
    return out, _for_each_block(p, body)


@_quiet
def forward_out(p, loss, lse, softmax):
    """Loss (and lse, and the softmax, when those buffers are given) into the given buffers."""
    clean = _labels_clean(p)

    def body(b):
        labels = None if p.soft_label else _TileLabels(b, clean)
        tile = b.work(softmax, 'exp')
        shift, sum_exp = _exp_shifted(b.x, tile)
        log_sum_exp = numpy.log(sum_exp)
        if lse is not None:
            b.put_rows(lse, shift + log_sum_exp)
        if p.soft_label:
            b.put_rows(loss, _soft_terms(b, shift, log_sum_exp, None, None, None))
        else:
            b.put_rows(loss, labels.loss(shift, log_sum_exp))
        if softmax is not None:
            tile *= 1 / sum_exp
            b.put_full(softmax, tile)
        return None if labels is None else labels.bad_row
    return _for_each_block(p, body)


@_quiet
def backward_out(p, loss_grad, lse, softmax, grad):
    """Gradient from ``softmax`` (Paddle's grad op: then ``p.x`` holds it) or recomputed from
    ``p.x`` and ``lse``.  ``grad`` may be ``p.x`` itself (in place): each tile's label logits
    are gathered before the tile is overwritten."""
    clean = _labels_clean(p)

    def body(b):
        labels = None if p.soft_label else _TileLabels(b, clean)
        tile = b.work(grad, 'grad', alias_ok=not p.soft_label)
        if softmax is None:
            row_lse = b.rows(lse)
            numpy.subtract(b.x, row_lse, out=tile)
            numpy.exp(tile, out=tile)
        elif tile is not b.x:
            numpy.copyto(tile, b.x)
        g = 1 if loss_grad is None else b.rows(loss_grad)
        if p.soft_label:
            _soft_terms(b, None, None, tile, loss_grad, tile)
        else:
            if loss_grad is not None:
                tile *= g
            label_prob = labels.picked if softmax is not None else numpy.exp(labels.picked - row_lse)
            labels.finish_gradient(tile, label_prob, g)
        b.put_full(grad, tile)
        return None if labels is None else labels.bad_row
    return _for_each_block(p, body)


@_quiet
def forward_backward_out(p, loss_grad, loss, grad):
    """Loss and gradient from one read of the logits; ``grad`` may be ``p.x`` (in place)."""
    clean = _labels_clean(p)

    def body(b):
        labels = None if p.soft_label else _TileLabels(b, clean)
        tile = b.work(grad, 'grad', alias_ok=not p.soft_label)
        shift, sum_exp = _exp_shifted(b.x, tile)
        log_sum_exp = numpy.log(sum_exp)
        g = 1 if loss_grad is None else b.rows(loss_grad)
        if p.soft_label:
            tile *= 1 / sum_exp
            b.put_rows(loss, _soft_terms(b, shift, log_sum_exp, tile, loss_grad, tile))
        else:
            b.put_rows(loss, labels.loss(shift, log_sum_exp))
            tile *= g / sum_exp  # softmax * loss_grad
            labels.finish_gradient(tile, numpy.exp((labels.picked - shift) - log_sum_exp), g)
        b.put_full(grad, tile)
        return None if labels is None else labels.bad_row
    return _for_each_block(p, body)
