"""Backends the semantic tests run on.

* ``numpy``   -- the NumPy backend.
* ``harness`` -- the CuPy backend's host logic and the very CUDA kernels of
  ``cupy_sce/kernels``, compiled with g++ and executed on the CPU
  (``cupy_sce.testing.harness``).  Skips only when g++ or the CUDA headers
  are missing.
* ``cupy``    -- the CuPy backend on a real GPU.  Skips without one.
"""
import contextlib

import numpy
import pytest

import cupy_sce


def gpu_available():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


class Backend:
    def __init__(self, name):
        self.name = name
        self.xp = numpy
        self._harness = None
        if name == 'cupy':
            if not gpu_available():
                pytest.skip('no CUDA GPU present: the cupy backend runs on the host harness instead')
            import cupy
            self.xp = cupy
        elif name == 'harness':
            from cupy_sce.testing import harness
            reason = harness.unavailable_reason()
            if reason:
                pytest.skip('host harness unavailable: ' + reason)
            self._harness = harness.backend()

    def asarray(self, a):
        return self.xp.asarray(a) if isinstance(a, numpy.ndarray) else a

    @staticmethod
    def to_numpy(a):
        if isinstance(a, tuple):
            return tuple(Backend.to_numpy(v) for v in a)
        return a.get() if hasattr(a, 'get') else a

    @contextlib.contextmanager
    def active(self):
        if self._harness is None:
            yield
        else:
            with cupy_sce._api.use_backend(self._harness):
                yield

    def __call__(self, fn, *args, **kwargs):
        """Call ``fn`` with numpy arguments moved to this backend; results come back as numpy."""
        args = [self.asarray(a) for a in args]
        kwargs = {k: self.asarray(v) for k, v in kwargs.items()}
        with self.active():
            return self.to_numpy(fn(*args, **kwargs))


@pytest.fixture(params=['numpy', 'harness', 'cupy'])
def backend(request):
    return Backend(request.param)


@pytest.fixture
def numpy_backend():
    return Backend('numpy')
