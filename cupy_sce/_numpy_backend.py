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

Speed: rows are processed in tiles of about 4 MiB (BLOCK_ELEMENTS, measured),
one chunk of tiles per thread of a pool (NumPy releases the GIL inside
ufuncs), with in-place ufuncs writing into per-thread scratch or straight into
the output; each tile does its own label step, as each kernel row does.  When K is tiny a row-wise
reduction is all overhead, so such blocks are transposed to ``(1, K, rows)``
and reduced across K contiguous vectors -- the layout the strided
(``inner > 1``) case already has.  There is no loop over rows in Python and
no N*K temporary: extra memory is O(threads x block).

One step differs from the kernels in how, not what: their online merge gets the
row max in the same read as the sum, while here it costs a pass of its own and a
broadcast subtraction.  So step 2 first tries ``exp(x)`` unshifted and keeps it
when every row's sum is safe (see ``_exp_sum``), and the backward from lse folds
the shift into its scale (``_exp_minus_lse``).
"""
import concurrent.futures
import functools
import os
import threading
import typing
import weakref

import numpy

from cupy_sce import _output_cache

# Elements of one tile (4 MiB of float32): large enough that the about 25 NumPy calls a tile
# pays in Python overhead (partly under the GIL) are small against its work, small enough to stay
# in a shared L3; the measurements behind it are in docs/performance.md.
BLOCK_ELEMENTS = 1 << 20
# Smaller problems get smaller tiles, down to this, so that every thread has
# TILES_PER_THREAD of them to balance the load.
MIN_BLOCK_ELEMENTS = 1 << 16
TILES_PER_THREAD = 4
# Contiguous rows with at most this many classes are transposed (see module docstring).
SMALL_K = 64
# Label smoothing sums the logits in float32 while every row's |lse| is at most this, else in
# float64 (see _Family.smoothed_hard_loss): at 64 the float32 sum is off by a few 1e-6.
SMOOTH_DIRECT_LSE = 64.0

_local = threading.local()
_pool = None
_pool_lock = threading.Lock()
_num_threads = None


_usable_cores = None


def _default_num_threads():
    env = os.environ.get('CUPY_SCE_NUM_THREADS')
    if env:
        if not env.strip().isdigit() or int(env) < 1:
            raise ValueError('CUPY_SCE_NUM_THREADS must be a positive integer, got {!r}'.format(env))
        return int(env)
    global _usable_cores
    if _usable_cores is None:  # a system call: once per process (it is on every call's path)
        try:
            _usable_cores = max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            _usable_cores = max(1, os.cpu_count() or 1)
    return _usable_cores


def get_num_threads():
    """Threads the NumPy backend uses (``CUPY_SCE_NUM_THREADS`` or the usable cores)."""
    return _num_threads or _default_num_threads()


def set_num_threads(n):
    """Set the NumPy backend's thread count (``None`` restores the default)."""
    global _num_threads, _pool
    if isinstance(n, numpy.integer):
        n = int(n)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError('num_threads must be a positive int or None, got {!r}'.format(n))
    with _pool_lock:
        _num_threads = n
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None


def release_scratch():
    """Free the NumPy backend's per-thread scratch buffers and its cache of dropped outputs (the
    next call allocates them again).

    Each thread keeps its tile buffers between calls -- about 4 MiB each (8 MiB in float64), one
    to SCRATCH_SLOTS of them depending on the call -- and the memory of large outputs the caller
    has dropped is kept for the next output of the same size (``set_output_cache_limit``), so
    that a training loop does not pay page faults every step.  Safe at any time: a call running
    meanwhile keeps the buffers it holds, and outputs still alive are not affected.
    """
    with _caches_lock:
        for cache in list(_caches):
            cache.clear()
    _output_cache.release()


# Which implementation runs the tiles: 'numba' (the compiled path, _cpu_kernels), 'numpy' (the
# pure-NumPy steps below) or 'auto' (numba when it imports).  See set_cpu_kernels.
_CPU_KERNELS = ('auto', 'numba', 'numpy')
_cpu_kernels_choice = None
_cpu_kernels_module = None  # False: numba did not import


# get_cpu_kernels' answer until set_cpu_kernels is called (it is on every call's path)
_cpu_kernels_in_use = None
_cpu_kernels_lock = threading.Lock()  # the choice and the cached answer change together


def _default_cpu_kernels():
    env = os.environ.get('CUPY_SCE_CPU_KERNELS', 'auto')
    if env not in _CPU_KERNELS:
        raise ValueError('CUPY_SCE_CPU_KERNELS must be one of {}, got {!r}'.format(_CPU_KERNELS, env))
    return env


def set_cpu_kernels(kind):
    """Choose the NumPy backend's CPU kernels: ``'numba'`` (compiled: one fused pass per row, a
    vectorized exp of its own; needs numba, ``pip install cupy_sce[cpu]``), ``'numpy'`` (pure
    NumPy) or ``'auto'`` (numba when it imports); ``None`` restores the default
    (``CUPY_SCE_CPU_KERNELS``, else ``'auto'``).  Soft labels and ``softcap`` always run on
    NumPy's steps.  ``'numba'`` without numba raises ImportError."""
    global _cpu_kernels_choice, _cpu_kernels_in_use
    if kind is not None and (not isinstance(kind, str) or kind not in _CPU_KERNELS):
        raise ValueError('cpu kernels must be one of {} or None, got {!r}'.format(_CPU_KERNELS, kind))
    if kind == 'numba' and _compiled_module() is None:
        raise ImportError("set_cpu_kernels('numba') needs numba (pip install cupy_sce[cpu])")
    with _cpu_kernels_lock:
        _cpu_kernels_choice = kind
        _cpu_kernels_in_use = None


def get_cpu_kernels():
    """The CPU kernels calls use now: ``'numba'`` or ``'numpy'`` (see set_cpu_kernels).
    ``CUPY_SCE_CPU_KERNELS`` is read at the first call (and again after ``set_cpu_kernels``)."""
    global _cpu_kernels_in_use
    in_use = _cpu_kernels_in_use
    if in_use is not None:
        return in_use
    with _cpu_kernels_lock:
        choice = _cpu_kernels_choice or _default_cpu_kernels()
        if choice == 'numpy':
            in_use = 'numpy'
        elif _compiled_module() is None:
            if choice == 'numba':
                raise ImportError("CUPY_SCE_CPU_KERNELS=numba needs numba (pip install cupy_sce[cpu])")
            in_use = 'numpy'
        else:
            in_use = 'numba'
        _cpu_kernels_in_use = in_use
    return in_use


def _compiled_module():
    """``_cpu_kernels`` once numba imports (imported at first use), else None."""
    global _cpu_kernels_module
    if _cpu_kernels_module is None:
        try:
            from cupy_sce import _cpu_kernels
            _cpu_kernels_module = _cpu_kernels
        except Exception:  # noqa: BLE001 -- numba missing, or a numba this code does not fit: the NumPy steps
            _cpu_kernels_module = False
    return _cpu_kernels_module or None


def _compiled_for(p):
    """The compiled kernels when they take this problem (hard labels, no soft cap), else None."""
    if p.soft_label or p.softcap is not None or get_cpu_kernels() != 'numba':
        return None
    return _compiled_module()


def _executor():
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(get_num_threads(),
                                                          thread_name_prefix='cupy_sce')
        return _pool


class _Cache(dict):
    """A thread's scratch buffers by slot (a dict that a WeakSet can hold: hashed by identity)."""
    __hash__ = object.__hash__


# Every live thread's scratch (see _scratch), so that release_scratch can empty them all; a
# thread's goes when the thread does.
_caches = weakref.WeakSet()
_caches_lock = threading.Lock()
# Scratch slots a thread can hold at once: x, soft, cap, exp, grad, target, terms, slope, slope+
# (the compiled path uses x, exp, grad and the per-row loss and lse, fewer at once)
# (tests/test_contract.py checks the peak memory of a call against SCRATCH_SLOTS tiles a thread).
SCRATCH_SLOTS = 9


def _scratch(slot, shape, dtype):
    """A per-thread reusable buffer: no allocation (and no page faults) per block.  The buffers
    stay between calls (at most SCRATCH_SLOTS tiles a thread) until release_scratch()."""
    cache = getattr(_local, 'cache', None)
    if cache is None:
        cache = _local.cache = _Cache()
        with _caches_lock:
            _caches.add(cache)
    size = 1
    for n in shape:
        size *= n
    buf = cache.get(slot)
    if buf is None or buf.dtype != dtype or buf.size < size:
        buf = cache[slot] = numpy.empty(max(size, 1), dtype)
    return buf[:size].reshape(shape)


class _Block:
    """One tile of rows: ``x`` in the compute dtype laid out as ``(ob, K, ib)``.

    The layout of a tile depends on K alone, so that a row's sums run in the same order
    whatever layout, batch or tile it comes in (see ``_row_sum``):

    * ``NATIVE``  -- the caller's ``(o1 - o0, K, i1 - i0)`` block as it is: contiguous rows of
      more than SMALL_K classes, or strided rows (``inner > 1``) of at most SMALL_K;
    * ``COLUMNS`` -- contiguous rows of at most SMALL_K classes, transposed to ``(1, K, rows)``;
    * ``ROWS``    -- strided rows of more than SMALL_K classes, transposed to ``(rows, K, 1)``
      (rows in ``(o, i)`` order).

    ``rows()``/``full()`` read and ``put_rows()``/``put_full()`` write the caller's
    ``(outer, inner)`` and ``(outer, K, inner)`` arrays in any layout.
    """

    def __init__(self, p, o0, o1, i0, i1, layout, cap_slope=False):
        self.p, self.o0, self.o1, self.i0, self.i1 = p, o0, o1, i0, i1
        self.layout = layout
        self.n_rows = (o1 - o0) * (i1 - i0)
        self.x = self.full(p.x, 'x')
        if p.softcap is not None:
            # the gradient's dy/dx, from x while the tile still holds it (an in-place gradient
            # overwrites the logits, and from y it would not be exact: see _cap_slope)
            self.cap_slope = _cap_slope_of(self.x, p.softcap) if cap_slope else None
            # y = softcap * tanh(x / softcap) replaces x in every step (into scratch: the
            # logits are never modified, and an in-place gradient may overwrite their tile)
            y = _scratch('cap', self.x.shape, p.acc_dtype) if numpy.may_share_memory(self.x, p.x) else self.x
            numpy.divide(self.x, p.softcap, out=y)
            numpy.tanh(y, out=y)
            y *= p.softcap
            self.x = y

    def full(self, arr, slot):
        view = arr[self.o0:self.o1, :, self.i0:self.i1]
        acc = self.p.acc_dtype
        if self.layout == COLUMNS:
            tile = _scratch(slot, (1, view.shape[1], view.shape[0]), acc)
            numpy.copyto(tile[0], view[:, :, 0].T)
            return tile
        if self.layout == ROWS:
            tile = _scratch(slot, (self.n_rows, view.shape[1], 1), acc)
            numpy.copyto(tile[:, :, 0].reshape(view.shape[0], view.shape[2], view.shape[1]),
                         view.transpose(0, 2, 1))
            return tile
        if view.dtype != acc:
            tile = _scratch(slot, view.shape, acc)
            numpy.copyto(tile, view)
            return tile
        return view

    def rows(self, arr):
        view = arr[self.o0:self.o1, self.i0:self.i1]
        if self.layout == COLUMNS:
            return view.reshape(1, 1, -1)
        if self.layout == ROWS:
            return view.reshape(-1, 1, 1)
        return view[:, None, :]

    def put_rows(self, out, value):
        view = out[self.o0:self.o1, self.i0:self.i1]
        numpy.copyto(view, value.reshape(view.shape))

    def work(self, out, slot, alias_ok=False):
        """A buffer for a full-size result: ``out``'s own tile when it can be written directly.

        With ``alias_ok`` the tile may be the logits' own (in place: the caller reads
        each x before writing its result and needs no x afterwards); otherwise a
        tile that overlaps x gets scratch.
        """
        if out is not None and self.layout == NATIVE and out.dtype == self.p.acc_dtype:
            tile = out[self.o0:self.o1, :, self.i0:self.i1]
            if alias_ok or not numpy.may_share_memory(tile, self.x):
                return tile
        return _scratch(slot, self.x.shape, self.p.acc_dtype)

    def put_full(self, out, work):
        view = out[self.o0:self.o1, :, self.i0:self.i1]
        if self.layout == COLUMNS:
            numpy.copyto(view[:, :, 0], work[0].T)
        elif self.layout == ROWS:
            numpy.copyto(view.transpose(0, 2, 1),
                         work[:, :, 0].reshape(view.shape[0], view.shape[2], view.shape[1]))
        elif not numpy.may_share_memory(view, work):
            numpy.copyto(view, work)


NATIVE, COLUMNS, ROWS = 'native', 'columns', 'rows'


def _layout(p):
    """The tile layout of a problem (see _Block): a function of K and whether rows are strided."""
    if p.inner == 1:
        return COLUMNS if p.K <= SMALL_K else NATIVE
    return NATIVE if p.K <= SMALL_K else ROWS


def _blocks(p, n_threads, layout=None):
    """Tiles covering all rows: whole rows, about ``elements`` each (BLOCK_ELEMENTS, less
    when a thread would get fewer than TILES_PER_THREAD tiles), in ``layout`` (default
    ``_layout(p)``)."""
    K = max(p.K, 1)
    if p.outer * p.inner == 0:
        return []
    elements = max(MIN_BLOCK_ELEMENTS,
                   min(BLOCK_ELEMENTS, p.outer * K * p.inner // (TILES_PER_THREAD * n_threads)))
    layout = layout or _layout(p)
    if p.inner == 1:
        rows = max(1, elements // K)
        return [(o0, min(o0 + rows, p.outer), 0, 1, layout) for o0 in range(0, p.outer, rows)]
    slab = K * p.inner
    if slab <= elements:
        outers = elements // slab
        return [(o0, min(o0 + outers, p.outer), 0, p.inner, layout)
                for o0 in range(0, p.outer, outers)]
    inners = max(1, elements // K)
    return [(o, o + 1, i0, min(i0 + inners, p.inner), layout)
            for o in range(p.outer) for i0 in range(0, p.inner, inners)]


def _for_each_block(p, body, cap_slope=False, layout=None):
    """Run ``body(block)`` over every tile and return the first non-None result (a bad row).
    ``cap_slope``: the tiles compute the soft cap's slope (``_Block.cap_slope``) for a gradient;
    ``layout``: the tiles' (default ``_layout(p)``).

    Tiles are split statically into one contiguous chunk per thread: one pool
    task per thread, not per tile.
    """
    threads = get_num_threads()
    tiles = _blocks(p, threads, layout)
    n_threads = min(threads, len(tiles))

    def run(chunk):
        found = []
        for tile in chunk:
            result = body(_Block(p, *tile, cap_slope=cap_slope))
            if result is not None:
                found.append(result)
        return min(found) if found else None

    def run_quietly(chunk):  # in a pool thread: numpy's error state is per thread
        with numpy.errstate(all='ignore'):
            return run(chunk)

    if n_threads <= 1:
        with numpy.errstate(all='ignore'):
            results = [run(tiles)]
    else:
        bounds = [len(tiles) * t // n_threads for t in range(n_threads + 1)]
        results = list(_executor().map(run_quietly, [tiles[a:b] for a, b in zip(bounds, bounds[1:])]))
    bad = [r for r in results if r is not None]
    return min(bad) if bad else None


# --------------------------------------------------------------------------
# steps (the kernels have a device function per step)
# --------------------------------------------------------------------------

def _row_max(x):
    """Step 1: max over the class axis; NaN propagates as in the kernels' nan_max."""
    return x.max(axis=1, keepdims=True)


def _row_sum(e, dtype=None):
    """Sum over the class axis of a tile-shaped ``(ob, K, ib)`` array (accumulated in ``dtype``,
    default the array's), in an order that depends on K alone, so that a row's sum (and every
    result) is the same whatever layout, batch, tile or thread count it comes in.

    * K <= SMALL_K (``COLUMNS`` or strided ``NATIVE`` tiles): one class after the other,
      vectorised across the rows.  A tile of one column is summed as one of two identical
      columns: alone, NumPy would make K its inner loop and sum pairwise.
    * K > SMALL_K (rows of ``(rows, K, 1)``): ``_blocked_sum``.
    """
    rows, K, cols = e.shape
    if K > SMALL_K:
        return _blocked_sum(e[:, :, 0], dtype)[:, None, None]
    if cols == 1:
        return numpy.broadcast_to(e, (rows, K, 2)).sum(axis=1, keepdims=True, dtype=dtype)[:, :, :1]
    return e.sum(axis=1, keepdims=True, dtype=dtype)


# Rows longer than this are summed in blocks of it (see _blocked_sum).
SUM_BLOCK = 2048


def _blocked_sum(flat, dtype=None):
    """Sums of the rows of a 2-D array with contiguous rows: each SUM_BLOCK classes summed with
    einsum's SIMD sum, then those partial sums (the short last block included) with it again.

    einsum is about 1.5x faster than NumPy's pairwise sum (docs/performance.md); alone over a
    long row it keeps a few dozen accumulators, each summing K / 64 terms one after the other
    (relative error 4.5e-6 at K = 2e6, measured), while the blocks keep every sum short (1e-7).
    Not a BLAS matrix-vector product: OpenBLAS threads every gemv above ~9K elements, and its
    threads inside ours oversubscribed the cores (3-4x slower, measured).  A single row is
    summed as one of two identical rows: einsum sums a lone row in 8192-element buffers.
    """
    rows, K = flat.shape
    if rows == 1:
        flat = numpy.broadcast_to(flat, (2, K))
    n_blocks, tail = divmod(K, SUM_BLOCK)
    if n_blocks == 0:
        return numpy.einsum('ij->i', flat, dtype=dtype)[:rows]
    partial = numpy.empty((flat.shape[0], n_blocks + (tail > 0)), dtype or flat.dtype)
    numpy.einsum('ijk->ij', flat[:, :n_blocks * SUM_BLOCK].reshape(-1, n_blocks, SUM_BLOCK),
                 out=partial[:, :n_blocks], dtype=dtype)
    if tail:
        numpy.einsum('ij->i', flat[:, n_blocks * SUM_BLOCK:], out=partial[:, n_blocks], dtype=dtype)
    return numpy.einsum('ij->i', partial)[:rows]


class _RowSums(typing.NamedTuple):
    """Step 2's result for the rows of a tile.

    ``lse = shift + log_sum_exp`` and the hard loss is ``log_sum_exp + (shift - x[label])``;
    the tile holds ``exp(x - s)`` for some per-row ``s`` and ``tile_sum`` is its sum over the
    classes, so ``softmax = tile / tile_sum``.
    """
    shift: object
    log_sum_exp: object
    tile_sum: object


def _exp_sum(x, exp_out, labels=None, shift_by_max=False):
    """Step 2 on a tile: ``_RowSums``, leaving the (shifted) exponentials in ``exp_out``, which
    must not overlap ``x``.

    The kernels' online merge gets the row max for free in their one read; here it is a pass
    of its own plus a broadcast subtraction, about 40% of the forward (measured).  So a tile
    first takes ``exp(x)`` unshifted, and a row keeps it when its sum lies in ``[0.5,
    finfo.max]``: then nothing overflowed, NaN is absent (a NaN sum fails the test) and a
    term that underflows to a subnormal is off by at most 2 subnormal ulps in the softmax, as
    in the shifted form.  If any row fails, the tile is redone with those rows shifted by
    their max (an all -inf row by the lowest finite value, so that ``x - shift`` never forms
    -inf - -inf; the kernels' merge shifts it by 0; both give sum 0 and lse -inf) and the
    others by 0, which leaves their exponentials bit for bit: a row's result never depends on
    its tile.  Soft labels (``shift_by_max``) shift every row: their loss has no label logit
    to hold it exactly.
    """
    dtype_char = x.dtype.char
    safe = False
    if not shift_by_max:
        numpy.exp(x, out=exp_out)
        sums = _label_sums(exp_out, labels)
        safe = (sums.tile_sum >= 0.5) & (sums.tile_sum <= _LIMITS[dtype_char].max)
        if safe.all():
            return _row_sums(0, sums, labels, dtype_char)
    row_max = _row_max(x)
    shift = numpy.where(safe, 0, numpy.maximum(row_max, _LIMITS[dtype_char].min, out=row_max))
    numpy.subtract(x, shift, out=exp_out)
    numpy.exp(exp_out, out=exp_out)
    shifted = _row_sums(shift, _label_sums(exp_out, labels), labels, dtype_char)
    if not numpy.any(safe):
        return shifted
    unshifted = _row_sums(0, sums, labels, dtype_char)
    return _RowSums(*(numpy.where(safe, a, b) for a, b in zip(unshifted, shifted)))


class _LabelSums(typing.NamedTuple):
    """Sums of a tile of exponentials ``exp(x - s)``: ``tile_sum`` over every class and, with hard
    labels, ``others`` over every class but the label (``label_exp`` is the label's term)."""
    tile_sum: object
    others: object = None
    label_exp: object = None


def _label_sums(exp_tile, labels):
    """``_LabelSums`` of a tile.  The label's term is left out of the sum (set to 0, the tile
    summed, the term put back), not subtracted from it afterwards: where the label dominates,
    ``sum - exp(x[label])`` would cancel the digits of the small loss (150 ulps on a loss of
    7e-3).  Two scatters of one element per row: nothing next to the sum itself."""
    if labels is None:
        return _LabelSums(_row_sum(exp_tile))
    label_exp = labels.gather(exp_tile)
    labels.put(exp_tile, 0)
    others = _row_sum(exp_tile)
    labels.put(exp_tile, label_exp)
    return _LabelSums(others + label_exp, others, label_exp)


def _row_sums(exp_shift, sums, labels, dtype_char):
    """``_RowSums`` for rows holding ``exp(x - exp_shift)`` summed as ``sums``.

    With hard labels ``shift`` is the label's own logit where it can be: then ``log_sum_exp =
    log1p(others * exp(exp_shift - x[label]))`` (``log1p`` of the sum over the other classes of
    ``exp(x_k - x[label])``) is the loss itself, exact for a confident prediction (a loss of
    1e-8 as well as one of 10), and exactly 0 when the other terms vanish (K = 1 gives loss 0
    and softmax 1).  A label logit more than EXP_HEADROOM below ``log(sum)`` would overflow the
    factor; those rows (and all rows without labels) keep ``exp_shift``, and their loss, above
    EXP_HEADROOM, adds terms that do not cancel.
    """
    log_tile_sum = numpy.log(sums.tile_sum)
    if labels is None:
        return _RowSums(exp_shift, log_tile_sum, sums.tile_sum)
    relative = labels.picked - exp_shift
    # (a label logit of -inf is far too: in a row of -inf its shift would make lse NaN, not -inf)
    far = (relative < log_tile_sum - _EXP_HEADROOM[dtype_char]) | (relative == -numpy.inf)
    if not far.any():  # the usual tile: no selects (tiny K makes these row passes count)
        others = numpy.exp(numpy.negative(relative, out=relative), out=relative)
        others *= sums.others
        return _RowSums(labels.picked, numpy.log1p(others, out=others), sums.tile_sum)
    shift = numpy.where(far, exp_shift, labels.picked)
    others = sums.others * numpy.exp(numpy.where(far, 0, -relative))
    return _RowSums(shift, numpy.where(far, log_tile_sum, numpy.log1p(others)), sums.tile_sum)


def _exp_minus_lse(x, row_lse, out, scale=None):
    """``out = exp(x - lse) * scale``: the softmax, scaled unless ``scale`` is None.

    A row whose lse lies in ``[log 0.5, EXP_HEADROOM]`` (NaN fails) cannot overflow in
    ``exp(x)`` (``x <= lse``), so its shift folds into the scale: one broadcast pass instead
    of two, errors as in ``_exp_sum``.  Other rows subtract their lse first; safe rows then
    subtract 0, so again a row's result never depends on its tile.
    """
    safe = (row_lse >= _LOG_HALF) & (row_lse <= _EXP_HEADROOM[x.dtype.char])
    if safe.all():
        numpy.exp(x, out=out)
        factor = numpy.exp(-row_lse)
    else:
        numpy.subtract(x, numpy.where(safe, 0, row_lse), out=out)
        numpy.exp(out, out=out)
        factor = numpy.where(safe, numpy.exp(-row_lse), 1)
    out *= factor if scale is None else factor * scale


_LIMITS = {'f': numpy.finfo(numpy.float32), 'd': numpy.finfo(numpy.float64)}
# exp(EXP_HEADROOM + 1) and its reciprocal stay finite and normal (float32 overflows at 88.7,
# float64 at 709.8).
_EXP_HEADROOM = {'f': 80.0, 'd': 700.0}
_LOG_HALF = float(numpy.log(0.5))


def _quiet(fn):
    """NaN and inf are valid inputs here (they must propagate): no RuntimeWarnings."""
    @functools.wraps(fn)
    def wrapper(*args):
        with numpy.errstate(all='ignore'):
            return fn(*args)
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
            ignored, bad = _label_masks(label, p)
            self.ignored = ignored if ignored.any() else None
            self.bad = bad if bad.any() else None
            if self.ignored is not None or self.bad is not None:
                self.invalid = ignored | bad
        self.index = label if self.invalid is None else numpy.where(self.invalid, 0, label)
        # flat offsets of the labels' elements in a C-contiguous tile of this shape (take / item
        # assignment: cheaper than *_along_axis, which builds index grids on every call)
        n_tiles, _, columns = b.x.shape
        if columns == 1:
            self.flat = _arange(n_tiles) * p.K + self.index.reshape(-1)
        else:
            self.flat = (_arange(n_tiles)[:, None] * (p.K * columns) + _arange(columns)[None, :]
                         + self.index.reshape(n_tiles, columns) * columns).reshape(-1)
        self.picked = self.gather(b.x)
        self.bad_row = _first_bad_row(b, self.bad) if p.check_labels and self.bad is not None else None

    def gather(self, tile):
        """``tile[label]`` for each row of a tile-shaped array (class 0 where invalid)."""
        if tile.flags.c_contiguous:
            return tile.reshape(-1).take(self.flat).reshape(self.index.shape)
        return numpy.take_along_axis(tile, self.index, axis=1)

    def cross_entropy(self, shift, log_sum_exp):
        """Step 4 (hard): ``lse - x[label]`` as ``log_sum_exp + (shift - x[label])``, which stays
        exact where lse would first be rounded (masked by ``mask_rows``)."""
        return log_sum_exp + (shift - self.picked)

    def mask_rows(self, rows):
        """Ignored rows become 0, unchecked bad rows NaN (selected, not multiplied: their logits
        may be NaN or inf); ``rows`` is a row-shaped or tile-shaped array, changed in place."""
        if self.ignored is not None:
            numpy.copyto(rows, 0, where=self.ignored)
        if self.bad is not None:
            numpy.copyto(rows, numpy.nan, where=self.bad)
        return rows

    def put(self, tile, value):
        """``tile[label] = value`` (per row) in a tile-shaped array."""
        if tile.flags.c_contiguous:
            if numpy.ndim(value) and value.size == self.flat.size:
                value = value.reshape(-1)
            elif numpy.ndim(value):
                value = numpy.broadcast_to(value, self.index.shape).reshape(-1)
            tile.reshape(-1)[self.flat] = value  # a scalar is broadcast by the assignment
        else:
            numpy.put_along_axis(tile, self.index, value, axis=1)


class _Family:
    """The loss family's terms of one tile: the target ``t`` (one-hot or soft label, smoothed),
    the row weight ``w`` (Paddle's ``sum_k t_k weight_k``) and the z-loss, as in the kernels'
    ``row_terms``.  A feature that is off costs nothing here: its term is None (or 1)."""

    def __init__(self, b, labels):
        p = b.p
        self.p = p
        self.eps = p.label_smoothing
        self.target = None
        if p.soft_label:
            soft = b.full(p.label, 'soft')
            if self.eps:  # t = (1 - eps) * label + eps / K, never written into the caller's label
                target = _scratch('target', soft.shape, p.acc_dtype)
                numpy.multiply(soft, 1 - self.eps, out=target)
                target += self.eps / p.K
                soft = target
            self.target = soft
        self.weight = None  # per row
        if p.weight is not None:
            if p.soft_label:
                weighted = numpy.multiply(self.target, p.weight.reshape(1, -1, 1),
                                          out=_scratch('terms', b.x.shape, p.acc_dtype))
                if not numpy.isfinite(p.weight_sum[0]):  # a class no target touches adds 0, not NaN
                    weighted[self.target == 0] = 0
                self.weight = _row_sum(weighted)
            else:
                self.weight = p.hard_row_weight(labels.index)

    def target_sum(self):
        """``sum_k t_k``: 1 for hard labels, ``(1 - eps) sum_k label_k + eps`` for soft ones."""
        return 1 if self.target is None else _row_sum(self.target)

    def prob_scale(self, lse):
        """What softmax_k is multiplied by in the gradient: ``sum_k t_k + 2 z lse``."""
        total = self.target_sum()
        return total + (2 * self.p.z_loss) * lse if self.p.z_loss else total

    def grad_scale(self, g):
        """``loss_grad * w`` per row (``g`` may be the scalar 1)."""
        return g if self.weight is None else g * self.weight

    def finish_loss(self, ce, lse):
        """The row loss from its cross-entropy term: ``w * (ce + z lse**2)``."""
        if self.p.z_loss:
            ce = ce + self.p.z_loss * lse * lse
        return ce if self.weight is None else ce * self.weight

    def smoothed_hard_loss(self, b, ce, shift, log_sum_exp):
        """Hard labels with smoothing: ``(1 - eps) ce + eps (lse - mean_k y_k)``.

        ``lse - mean_k y_k`` cancels when the logits share a large offset (at 1e4 a float32 sum
        of y would cost 4 digits).  Where every row's ``|lse|`` is at most SMOOTH_DIRECT_LSE (then
        no logit exceeds it, and the term is not smaller than the terms' magnitude) a float32
        sum of y is exact enough; other rows take y summed in float64.  The same summation order
        either way (``_row_sum``), and the choice is per row, so a row's bits do not depend on its
        tile.
        """
        if not self.eps:
            return ce
        p = b.p
        mean_term = shift - _row_sum(b.x) / p.K
        if p.acc_dtype == numpy.float32:
            direct = numpy.abs(shift + log_sum_exp) <= SMOOTH_DIRECT_LSE  # NaN rows: either is NaN
            if not direct.all():  # chosen per row: a row's bits never depend on its neighbours
                precise = (shift - _row_sum(b.x, numpy.float64) / p.K).astype(p.acc_dtype)
                mean_term = numpy.where(direct, mean_term, precise)
        return (1 - self.eps) * ce + self.eps * (log_sum_exp + mean_term)

    def hard_gradient(self, b, labels, tile, label_pm1, scale, lse, gw):
        """Step 5's label terms on a tile holding ``softmax * scale * gw`` (``scale``: ``prob_scale``): subtract the
        target ``((1 - eps) [k == label] + eps / K) * gw``.  The label's own term ``softmax * scale - t``
        is formed in the compute dtype from ``label_pm1 = softmax[label] - 1`` (the caller's
        ``expm1`` of the label's log-probability, exact for a confident prediction, where
        ``softmax - 1`` would be 0 or a few ulps of 1): ``(softmax - 1) scale + (scale - 1) + (1 - t)``,
        with ``scale - 1 = 2 z lse`` and ``1 - t = eps - eps / K``."""
        if self.eps:
            tile -= (self.eps / b.p.K) * gw
        term = label_pm1 * scale
        if self.p.z_loss:
            term += (2 * self.p.z_loss) * lse
        if self.eps:
            term += self.eps - self.eps / b.p.K
        labels.put(tile, term * gw)


def _cap_slope_of(x, c):
    """dy/dx of the soft cap at ``x``: ``1 - tanh(x / c)**2 = 4 e / (1 + e)**2`` with ``e = exp(-2 |x| / c)``,
    relatively exact at every x.  (From y = c tanh(x / c), ``(1 - y / c)(1 + y / c)`` inherits tanh's
    absolute rounding: near saturation, where ``1 - y / c`` is 1e-5, that is 1% of the slope.)"""
    slope = _scratch('slope', x.shape, x.dtype)
    numpy.abs(x, out=slope)
    slope *= -2 / c
    numpy.exp(slope, out=slope)
    denominator = numpy.add(slope, 1, out=_scratch('slope+', x.shape, x.dtype))
    denominator *= denominator
    slope *= 4
    slope /= denominator
    return slope


def _cap_slope(b, tile):
    """``tile *= dy/dx`` under a soft cap (``b.cap_slope``, from the tile's x)."""
    if b.p.softcap is not None:
        tile *= b.cap_slope


def _labels_clean(p):
    """True when every hard label is in [0, K) and none equals ignore_index (two reductions,
    no temporaries): tiles then skip the mask work."""
    if p.soft_label or p.label.size == 0:
        return True
    lo, hi = p.label.min(), p.label.max()
    return bool(0 <= lo and hi < p.K and not lo <= p.ignore_index <= hi)


def _label_masks(label, p):
    """``(ignored, bad)`` masks of hard labels: equal to ignore_index, or neither that nor in [0, K)
    (the kernels' classify_label)."""
    ignored = label == p.ignore_index
    return ignored, ~ignored & ((label < 0) | (label >= p.K))


def _arange(n):
    cache = getattr(_local, 'arange', None)
    if cache is None or cache.size < n:
        cache = _local.arange = numpy.arange(max(n, 1024), dtype=numpy.intp)
    return cache[:n]


def _first_bad_row(b, bad):
    """Canonical row index (o * inner + i) of the tile's first out-of-range label."""
    flat = int(numpy.flatnonzero(bad.reshape(-1))[0])
    ib = b.i1 - b.i0
    return (b.o0 + flat // ib) * b.p.inner + b.i0 + flat % ib


def _soft_terms(b, fam, shift, log_sum_exp, prob, scale, gw, grad):
    """Steps 4-5 (soft) on a tile: the cross-entropy term ``sum_k t_k * (lse - y_k)`` (a zero
    target adds 0 even at y_k = -inf) and, into ``grad``, ``(softmax * scale - t) * gw``
    (``scale``: ``fam.prob_scale``)."""
    p = b.p
    target = fam.target
    ce = None
    if shift is not None:
        terms = _scratch('terms', b.x.shape, p.acc_dtype)
        numpy.subtract(shift, b.x, out=terms)
        terms += log_sum_exp
        terms *= target
        terms[target == 0] = 0
        ce = _row_sum(terms)
    if grad is not None:
        # d/dy_k [sum_j t_j (lse - y_j) + z lse^2] = softmax_k * (sum_j t_j + 2 z lse) - t_k
        numpy.multiply(prob, scale * gw, out=grad)
        # target may be a view of the caller's label: never scale it in place
        grad -= numpy.multiply(target, gw, out=_scratch('terms', b.x.shape, p.acc_dtype))
    return ce


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
        sums = _exp_sum(b.x, _scratch('exp', b.x.shape, p.acc_dtype))
        b.put_rows(out, sums.shift + sums.log_sum_exp)
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


def first_bad_label(p):
    """The first canonical row whose hard label is neither in [0, K) nor ignore_index, or None:
    the check before an in-place call, from the labels alone (two reductions when every label is
    in range; the logits are not read, as ``gather_label_logit`` would)."""
    if p.soft_label or p.label.size == 0:
        return None
    lo, hi = p.label.min(), p.label.max()
    if 0 <= lo and hi < p.K:
        return None
    bad = numpy.flatnonzero(_label_masks(p.label.reshape(-1), p)[1])  # (outer, inner): flat = canonical row
    return int(bad[0]) if bad.size else None


def forward_out(p, loss, lse, softmax):
    """Loss rows (compute dtype), and lse and the softmax when those buffers are given (the
    softmax only without features: Paddle's op)."""
    compiled = _compiled_for(p)
    if compiled is not None:
        op = compiled.FORWARD if softmax is None else compiled.FORWARD_SOFTMAX
        return _compiled_rows(compiled, p, op, loss=loss, lse=lse, out=softmax)
    return _forward_steps(p, loss, lse, softmax)


@_quiet
def _forward_steps(p, loss, lse, softmax):
    clean = _labels_clean(p)

    def body(b):
        labels = None if p.soft_label else _TileLabels(b, clean)
        fam = _Family(b, labels)
        tile = b.work(softmax, 'exp')
        sums = _exp_sum(b.x, tile, labels, shift_by_max=p.soft_label)
        row_lse = sums.shift + sums.log_sum_exp
        if lse is not None:
            b.put_rows(lse, row_lse)
        if p.soft_label:
            ce = _soft_terms(b, fam, sums.shift, sums.log_sum_exp, None, None, None, None)
        else:
            ce = fam.smoothed_hard_loss(b, labels.cross_entropy(sums.shift, sums.log_sum_exp), sums.shift,
                                        sums.log_sum_exp)
        row_loss = fam.finish_loss(ce, row_lse)
        b.put_rows(loss, row_loss if labels is None else labels.mask_rows(row_loss))
        if softmax is not None:
            # divided, not scaled by 1/sum: a row whose other terms underflow gives exactly 1
            # from an unshifted exp(x) too (slower than the product, but only this output)
            numpy.divide(tile, sums.tile_sum, out=tile)
            b.put_full(softmax, tile)
        return None if labels is None else labels.bad_row
    return _for_each_block(p, body)


def backward_out(p, loss_grad, lse, softmax, grad):
    """Gradient from ``softmax`` (Paddle's grad op: then ``p.x`` holds it) or recomputed from
    ``p.x`` and ``lse``.  ``grad`` may be ``p.x`` itself (in place): each tile's label logits
    are gathered before the tile is overwritten."""
    compiled = _compiled_for(p)
    if compiled is not None:
        op = compiled.BACKWARD_LSE if softmax is None else compiled.BACKWARD_SOFTMAX
        return _compiled_rows(compiled, p, op, loss_grad=loss_grad, lse_in=lse, out=grad)
    return _backward_steps(p, loss_grad, lse, softmax, grad)


@_quiet
def _backward_steps(p, loss_grad, lse, softmax, grad):
    clean = _labels_clean(p)

    def body(b):
        labels = None if p.soft_label else _TileLabels(b, clean)
        fam = _Family(b, labels)
        tile = b.work(grad, 'grad', alias_ok=not p.soft_label)
        g = 1 if loss_grad is None else b.rows(loss_grad)
        gw = fam.grad_scale(g)
        row_lse = None if softmax is not None else b.rows(lse)
        scale = fam.prob_scale(row_lse)
        # soft labels: _soft_terms applies the scales itself
        tile_scale = None if p.soft_label else _times(scale, gw)
        if softmax is None:
            _exp_minus_lse(b.x, row_lse, tile, tile_scale)
        else:
            if tile is not b.x:
                numpy.copyto(tile, b.x)
            if tile_scale is not None:
                tile *= tile_scale
        if p.soft_label:
            _soft_terms(b, fam, None, None, tile, scale, gw, tile)
        else:
            # a stored softmax is all there is; from the lse, expm1 of the label's log-probability
            label_pm1 = labels.picked - 1 if softmax is not None else numpy.expm1(labels.picked - row_lse)
            fam.hard_gradient(b, labels, tile, label_pm1, scale, row_lse, gw)
        _cap_slope(b, tile)
        if labels is not None:
            labels.mask_rows(tile)
        b.put_full(grad, tile)
        return None if labels is None else labels.bad_row
    return _for_each_block(p, body, cap_slope=True)


def _times(a, b):
    """``a * b`` where either may be the scalar 1 (then None when both are: no scaling)."""
    if isinstance(a, int) and a == 1:
        return None if isinstance(b, int) and b == 1 else b
    return a if isinstance(b, int) and b == 1 else a * b


def forward_backward_out(p, loss_grad, loss, grad):
    """Loss and gradient from one read of the logits; ``grad`` may be ``p.x`` (in place)."""
    compiled = _compiled_for(p)
    if compiled is not None:
        return _compiled_rows(compiled, p, compiled.FORWARD_BACKWARD, loss_grad=loss_grad, loss=loss,
                              out=grad)
    return _forward_backward_steps(p, loss_grad, loss, grad)


@_quiet
def _forward_backward_steps(p, loss_grad, loss, grad):
    clean = _labels_clean(p)

    def body(b):
        labels = None if p.soft_label else _TileLabels(b, clean)
        fam = _Family(b, labels)
        tile = b.work(grad, 'grad', alias_ok=not p.soft_label)
        # in place the exponentials go to scratch: _exp_sum may need x again
        exp_tile = _scratch('exp', b.x.shape, p.acc_dtype) if numpy.may_share_memory(tile, b.x) else tile
        sums = _exp_sum(b.x, exp_tile, labels, shift_by_max=p.soft_label)
        row_lse = sums.shift + sums.log_sum_exp
        g = 1 if loss_grad is None else b.rows(loss_grad)
        gw = fam.grad_scale(g)
        scale = fam.prob_scale(row_lse)
        if p.soft_label:
            numpy.multiply(exp_tile, 1 / sums.tile_sum, out=tile)  # the softmax
            ce = _soft_terms(b, fam, sums.shift, sums.log_sum_exp, tile, scale, gw, tile)
            b.put_rows(loss, fam.finish_loss(ce, row_lse))
        else:
            ce = fam.smoothed_hard_loss(b, labels.cross_entropy(sums.shift, sums.log_sum_exp), sums.shift,
                                        sums.log_sum_exp)
            b.put_rows(loss, labels.mask_rows(fam.finish_loss(ce, row_lse)))
            tile_scale = _times(scale, gw)
            numpy.multiply(exp_tile, (1 if tile_scale is None else tile_scale) / sums.tile_sum, out=tile)
            # the label's log-probability -(lse - x[label]), from log1p of the other classes (_row_sums)
            fam.hard_gradient(b, labels, tile, numpy.expm1((labels.picked - sums.shift) - sums.log_sum_exp), scale,
                              row_lse, gw)
        _cap_slope(b, tile)
        if labels is not None:
            labels.mask_rows(tile)
        b.put_full(grad, tile)
        return None if labels is None else labels.bad_row
    return _for_each_block(p, body, cap_slope=True)


def _compiled_rows(compiled, p, op, loss_grad=None, lse_in=None, loss=None, lse=None, out=None):
    """Run the compiled path over the tiles; returns the first bad row (canonical index) or None.

    Rows of more than SMALL_K classes go to ``compiled.rows`` as contiguous runs of K values
    (strided ones transposed: ``ROWS`` tiles); shorter ones to ``compiled.columns_of_rows`` when
    contiguous (it transposes blocks of them in cache) and to ``compiled.columns`` in the strided
    ``NATIVE`` tiles (K runs of rows), both running the same block steps.  Which steps a row takes
    depends on K alone, so its bits do not depend on the layout."""
    if p.outer * p.inner == 0:
        return None  # no rows
    acc = p.acc_dtype
    if p.features:
        weight = _ABSENT_INPUT[1][acc.char] if p.weight is None else _read_only(p.weight)
        weight_mean = acc.type(0) if p.weight is None else p.weight_sum[0] / p.K
        constants = (weight, weight_mean, acc.type(p.label_smoothing), acc.type(p.z_loss))
    else:
        constants = _NO_FEATURES[acc.char]
    if p.inner == 1 and p.dtype == acc and p.outer * p.K <= MIN_BLOCK_ELEMENTS:
        return _compiled_whole(compiled, p, op, constants, loss_grad, lse_in, loss, lse, out)
    # contiguous rows stay as they are (columns_of_rows transposes blocks of short ones in cache),
    # strided ones of more than SMALL_K classes are transposed to rows, strided short ones are
    # the columns kernel's slabs
    strided_columns = p.K <= compiled.COLUMNS_MAX_K and p.inner > 1
    layout = NATIVE if p.inner == 1 or strided_columns else ROWS

    def in_place(arr):  # a per-row output the kernel writes directly: contiguous, compute dtype
        return p.inner == 1 and arr.dtype == acc

    def body(b):
        slabs, K, m = b.x.shape  # (rows, K, 1) for rows; (slabs, K, m) for columns
        per_row = (slabs, m) if strided_columns else (slabs * m,)

        def rows_in(arr, dtype=acc):  # a per-row input, contiguous
            if arr is None:
                return _ABSENT_INPUT[len(per_row)][acc.char]
            return _read_only(numpy.ascontiguousarray(b.rows(arr).reshape(per_row), dtype=dtype))

        def rows_out(arr, slot):
            if arr is None:
                return _ABSENT[len(per_row)][acc.char]
            return arr.reshape(-1)[b.o0:b.o1] if in_place(arr) else _scratch(slot, per_row, acc)

        tile = None if out is None else b.work(out, 'grad', alias_ok=True)
        loss_rows, lse_rows = rows_out(loss, 'loss'), rows_out(lse, 'lse')
        if strided_columns:
            # a tile of part of a slab's rows is a strided view: contiguous copies, so that numba
            # compiles one signature (the output goes back through put_full)
            x, kernel = numpy.ascontiguousarray(b.x), compiled.columns
            work_shape = (K, compiled.column_block(K, m))
            if tile is not None and not tile.flags.c_contiguous:
                tile = _scratch('grad', b.x.shape, acc)
            out_tile = tile
        else:
            x = b.x.reshape(slabs, K)
            kernel, work_shape = _contiguous_kernel(compiled, K, slabs)
            out_tile = None if tile is None else tile.reshape(slabs, K)
        if out_tile is None:
            out_tile = _ABSENT[x.ndim][acc.char]
        bad = kernel(op, _read_only(x), rows_in(p.label, numpy.int64), rows_in(lse_in), rows_in(loss_grad),
                     p.ignore_index, *constants, loss_rows, lse_rows, out_tile,
                     _scratch('exp', work_shape, acc))
        for arr, rows in ((loss, loss_rows), (lse, lse_rows)):
            if arr is not None and not in_place(arr):
                b.put_rows(arr, rows)
        if tile is not None:
            b.put_full(out, tile)
        if bad < 0 or not p.check_labels:
            return None
        columns = b.i1 - b.i0
        return (b.o0 + bad // columns) * p.inner + b.i0 + bad % columns
    return _for_each_block(p, body, layout=layout)


# Stand-ins for absent arrays (empty: nothing can be written into them), by rank and compute
# dtype: writeable ones for outputs, read-only ones for inputs (see _read_only).
_ABSENT = {rank: {c: numpy.empty((0,) * rank, c) for c in 'fd'} for rank in (1, 2, 3)}
_ABSENT_INPUT = {rank: {c: numpy.empty((0,) * rank, c) for c in 'fd'} for rank in (1, 2)}
for _group in _ABSENT_INPUT.values():
    for _array in _group.values():
        _array.flags.writeable = False


# rows()'s feature arguments when every feature is off: no weight, weight mean, eps and z-loss 0
_NO_FEATURES = {c: (_ABSENT_INPUT[1][c],) + (numpy.dtype(c).type(0),) * 3 for c in 'fd'}


def _read_only(arr):
    """A read-only view of a kernel input: the compiled kernels take every input read-only
    (and labels as int64), whatever the caller's arrays are, so that numba compiles one signature
    per kernel and dtype (a writeable and a read-only array are two numba types)."""
    view = arr.view()
    view.flags.writeable = False
    return view


def _contiguous_kernel(compiled, K, n_rows):
    """The kernel for a tile of ``n_rows`` contiguous rows of K classes, and its scratch's shape."""
    if K <= compiled.COLUMNS_MAX_K:
        return compiled.columns_of_rows, (K, compiled.column_block(K, n_rows))
    return compiled.rows, (K,)


def _compiled_whole(compiled, p, op, constants, loss_grad, lse_in, loss, lse, out):
    """``_compiled_rows`` for a small problem with contiguous rows in the compute dtype: the whole
    problem is one tile, so the kernel runs on it directly (no tile objects, no pool).  The
    kernel is the one a tile of these rows would take (by K), so the bits are the tiles'."""
    acc = p.acc_dtype
    n, K = p.outer, p.K
    absent_in, absent_out = _ABSENT_INPUT[1][acc.char], _ABSENT[1][acc.char]
    x = p.x.reshape(n, K)
    # the outputs have the logits' dtype, here the compute dtype: the kernel writes them directly
    out_tile = _ABSENT[2][acc.char] if out is None else out.reshape(n, K)
    kernel, work_shape = _contiguous_kernel(compiled, K, n)
    bad = kernel(
        op, _read_only(x), _read_only(p.label.reshape(n).astype(numpy.int64, copy=False)),
        absent_in if lse_in is None else _read_only(lse_in.reshape(n)),
        absent_in if loss_grad is None else _read_only(loss_grad.reshape(n)), p.ignore_index, *constants,
        absent_out if loss is None else loss.reshape(n), absent_out if lse is None else lse.reshape(n),
        out_tile, numpy.empty(work_shape, acc))
    return bad if bad >= 0 and p.check_labels else None
