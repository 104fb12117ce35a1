"""Recycled host memory for the NumPy backend's large outputs (the gradient, the softmax; the loss
and lse rows of 262,144 rows and more).

A fresh multi-MiB NumPy array is fresh pages from the kernel: each is faulted in and zeroed when
the kernel first writes it, then read for ownership.  For the fused forward+backward at
4096 x 32000 float32 that is about a third of the call (the gradient's 500 MiB; measurements in
docs/performance.md).  A training step allocates the same shapes every step and drops last
step's gradient before or right after it asks for the next, so the NumPy backend keeps the memory
of outputs the caller has dropped and hands it out again for the next output of the same byte
size, as CuPy's memory pool does on the GPU and as this backend already does for its tile scratch.

How an output comes back: it is a view of a ``_Block``, an object that owns a raw buffer and
exposes it through ``__array_interface__``; NumPy keeps that object as the array's base, so it
lives exactly as long as the output or any view of it.  Its ``__del__`` returns the buffer to the
cache.  The cache holds at most ``get_output_cache_limit()`` bytes (the oldest buffers go first;
a buffer that arrives while the lock is taken waits, uncounted, until the next call); buffers
come back only by exact byte size; outputs below ``MIN_BYTES`` are plain arrays (malloc already
recycles those); ``release_scratch()`` empties the cache and ``set_output_cache_limit(0)`` turns
it off.  An output is a view (``owndata`` is False, ``resize()`` refuses), like a reshaped array.

``__del__`` can run anywhere, inside the garbage collector too, possibly in a thread that holds
the cache's lock already: it never waits for the lock, and a buffer that arrives while the lock
is taken waits in a deque (appends are atomic) until the next call takes it in.
"""
import collections
import math
import os
import threading

import numpy

# Outputs smaller than this are plain NumPy arrays: malloc keeps and reuses freed blocks of up to
# its mmap threshold (128 KiB to 32 MiB, adjusted by glibc), and a block's page faults are few.
MIN_BYTES = 1 << 20


def _default_limit():
    """1 GiB, or an eighth of the machine's memory where that is less."""
    try:
        physical = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        physical = 0
    return min(1 << 30, physical // 8) if physical > 0 else 1 << 30


_lock = threading.Lock()
_limit = None  # bytes; None: _default_limit() on first use
_free = collections.OrderedDict()  # id -> raw buffer, oldest first
_free_bytes = 0
_arrived = collections.deque()  # buffers returned while _lock was taken


class _Block:
    """Owns ``raw`` (a 1-D uint8 array) for the outputs that view it; returns it when they are gone."""
    __slots__ = ('raw', '__array_interface__')

    def __init__(self, raw):
        self.raw = raw
        self.__array_interface__ = raw.__array_interface__

    def __del__(self):
        raw = self.raw
        try:
            if _lock.acquire(blocking=False):
                try:
                    _keep(raw)
                finally:
                    _lock.release()
            else:
                _arrived.append(raw)
        except Exception:  # pragma: no cover - interpreter shutdown: module globals already gone
            pass


def _keep(raw):
    """Put ``raw`` in the cache, dropping the oldest buffers beyond the limit (under _lock)."""
    global _free_bytes
    limit = _current_limit()
    if raw.nbytes > limit:
        return
    _free[id(raw)] = raw
    _free_bytes += raw.nbytes
    _evict_to(limit)


def _evict_to(limit):
    """Drop the oldest cached buffers until the cache holds at most ``limit`` bytes (under _lock)."""
    global _free_bytes
    while _free_bytes > limit:
        _, oldest = _free.popitem(last=False)
        _free_bytes -= oldest.nbytes


def _drain():
    """Take in the buffers that waited in ``_arrived`` (under _lock)."""
    while _arrived:
        _keep(_arrived.popleft())


def _take(nbytes):
    """A cached buffer of exactly ``nbytes`` (the most recently returned), or None (under _lock)."""
    global _free_bytes
    _drain()
    for key in reversed(_free):
        raw = _free[key]
        if raw.nbytes == nbytes:
            del _free[key]
            _free_bytes -= nbytes
            return raw
    return None


def _current_limit():
    global _limit
    if _limit is None:
        _limit = _default_limit()
    return _limit


def empty(shape, dtype):
    """``numpy.empty(shape, dtype)``, C-contiguous, from recycled memory when large enough."""
    dtype = numpy.dtype(dtype)
    nbytes = dtype.itemsize * math.prod(shape)
    if nbytes < MIN_BYTES or nbytes > _current_limit():
        if _arrived:  # buffers that found the lock taken: kept or dropped now, not left waiting
            with _lock:
                _drain()
        return numpy.empty(shape, dtype)
    with _lock:
        raw = _take(nbytes)
    if raw is None:
        raw = numpy.empty(nbytes, numpy.uint8)
    return numpy.asarray(_Block(raw)).view(dtype).reshape(shape)


def cached_bytes():
    """Bytes the cache holds now (buffers of dropped outputs waiting to be reused)."""
    with _lock:
        _drain()
        return _free_bytes


def release():
    """Drop every cached buffer (its memory goes back to the system)."""
    with _lock:
        _arrived.clear()
        _evict_to(0)


def get_output_cache_limit():
    """The most bytes the NumPy backend keeps of dropped outputs for reuse (0: no cache)."""
    return _current_limit()


def set_output_cache_limit(nbytes):
    """Set how many bytes of dropped outputs the NumPy backend keeps for reuse.

    Outputs of at least 1 MiB (the gradient, the softmax; the loss and lse of many rows) come from
    this cache: when the caller drops such an output, its memory is kept, up to ``nbytes`` in all,
    for the next output of the same size, so that a training loop does not pay fresh pages every
    step.  ``0`` turns the cache off (every output is a plain ``numpy.empty``); ``None`` restores
    the default (1 GiB, or an eighth of the machine's memory where that is less).  Lowering the
    limit drops the oldest cached buffers at once; ``release_scratch()`` drops all of them.
    """
    global _limit
    if isinstance(nbytes, numpy.integer):
        nbytes = int(nbytes)
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0):
        raise ValueError('nbytes must be an int >= 0 or None, got {!r}'.format(nbytes))
    with _lock:
        _limit = _default_limit() if nbytes is None else nbytes
        _drain()
        _evict_to(_limit)
