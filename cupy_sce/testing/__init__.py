"""Testing interface of cupy_sce.

* ``use_backend(backend)`` -- route the calls of this thread to a backend object,
  e.g. the host harness's ``cupy_sce.testing.harness.backend()``.
* ``default_backend(xp)`` -- the backend object a call on arrays of module ``xp`` uses.
* ``numpy_tile_elements(n)`` -- make the NumPy backend cut its work into tiles of about ``n``
  elements, so that small problems take the multi-tile, multi-thread paths of large ones.
* ``cupy_sce.testing.harness`` -- the CUDA kernels compiled with g++ and run on the CPU.

Importing this package needs neither CuPy nor g++: everything is imported when used.
"""
import contextlib


def use_backend(backend):
    """Context manager: route every cupy_sce call in this thread to ``backend`` until it exits.

    The previous routing is restored on exit (contexts nest); ``with use_backend(b) as b:``.
    The host harness's backend is ``cupy_sce.testing.harness.backend()``: the CuPy backend's
    host logic with NumPy arrays and the CUDA kernels executed on the CPU::

        from cupy_sce import testing
        from cupy_sce.testing import harness

        with testing.use_backend(harness.backend()):
            loss = cupy_sce.softmax_with_cross_entropy(numpy_logits, numpy_label)
    """
    from cupy_sce import _api
    return _api.use_backend(backend)


def default_backend(xp):
    """The backend object a call on arrays of module ``xp`` (``numpy`` or ``cupy``) uses.

    Inside ``use_backend(b)`` that is ``b``; otherwise the NumPy backend for ``numpy`` and the
    process's CuPy backend for ``cupy``, whose ``.runtime`` launches the kernels (tests wrap
    ``runtime.kernel`` to see which kernels run).
    """
    from cupy_sce import _api
    return _api._backend_for(xp)


@contextlib.contextmanager
def numpy_tile_elements(n):
    """Context manager: the NumPy backend's tiles hold about ``n`` elements (at least one row, or
    one column of a strided row) instead of 64K-1M, for every thread, until it exits.

    Results do not depend on the tiling (README, batch invariance); this lets a test check that
    on problems small enough to be quick, with rows split over many tiles and threads.
    """
    from cupy_sce import _numpy_backend
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError('n must be a positive int, got {!r}'.format(n))
    saved = _numpy_backend.BLOCK_ELEMENTS, _numpy_backend.MIN_BLOCK_ELEMENTS
    _numpy_backend.BLOCK_ELEMENTS = _numpy_backend.MIN_BLOCK_ELEMENTS = n
    try:
        yield
    finally:
        _numpy_backend.BLOCK_ELEMENTS, _numpy_backend.MIN_BLOCK_ELEMENTS = saved
