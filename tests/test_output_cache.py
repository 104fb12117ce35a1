"""The NumPy backend's cache of dropped outputs (``cupy_sce._output_cache``; README, Memory).

Large outputs (the gradient, the softmax; at least 1 MiB) are views of recycled buffers: when the
caller drops one, its memory serves the next output of the same byte size.  What must hold on
every backend whose outputs are host arrays (numpy, numba, the harness; on a GPU CuPy's pool
plays the part, and the same properties are checked there):

* an output's values never change while the caller holds it or any view of it, whatever is
  computed or dropped meanwhile, and no two live outputs share memory;
* a result from recycled memory is bit for bit the result from fresh memory;
* the cache holds at most its limit, gives its memory back on ``release_scratch()``, and is off
  at limit 0.
"""
import gc
import threading

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cupy_sce
from cupy_sce import _output_cache

# Byte-identical problems of different shapes and dtypes (64 x 4100 float32 = 32 x 4100 float64
# = 1,049,600 bytes, just above MIN_BYTES), so that one's dropped output serves another; and one
# below MIN_BYTES, which the cache does not take.
SHAPES = (((64, 4100), numpy.float32), ((32, 8200), numpy.float32), ((32, 4100), numpy.float64),
          ((8, 1000), numpy.float32))
# The same, 256 times smaller, for the property test on every backend (the harness runs the CUDA
# kernels on one core), with MIN_BYTES lowered to match; (70, 16) takes the short-row kernels.
SMALL_MIN_BYTES = 4096
SMALL_SHAPES = (((16, 70), numpy.float32), ((8, 140), numpy.float32), ((8, 70), numpy.float64),
                ((70, 16), numpy.float32), ((4, 10), numpy.float32))


@pytest.fixture(autouse=True)
def default_cache():
    cupy_sce.set_output_cache_limit(None)
    cupy_sce.release_scratch()
    yield
    cupy_sce.set_output_cache_limit(None)
    cupy_sce.release_scratch()


def _problem(case, seed, shapes=SHAPES):
    (shape, dtype), rng = shapes[case], numpy.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    label = rng.integers(0, shape[-1], (shape[0], 1))
    return x, label


def _call(backend, op, x, label):
    """The big output of ``op`` on ``backend``, as the backend's own array (not a copy)."""
    x, label = backend.asarray(x), backend.asarray(label)
    with backend.active():
        if op == 'gradient':
            return cupy_sce.forward_backward(x, label)[1]
        return cupy_sce.softmax_with_cross_entropy(x, label, return_softmax=True)[0]


def _fresh(backend, op, x, label):
    """The same output from fresh memory (cache off), as NumPy.  Turning the cache off drops what
    it holds: call this before the calls under test, not between them."""
    limit = cupy_sce.get_output_cache_limit()
    cupy_sce.set_output_cache_limit(0)
    try:
        return backend.to_numpy(_call(backend, op, x, label)).copy()
    finally:
        cupy_sce.set_output_cache_limit(limit)


@pytest.fixture
def small_min_bytes(monkeypatch):
    monkeypatch.setattr(_output_cache, 'MIN_BYTES', SMALL_MIN_BYTES)


@settings(max_examples=15)
@given(data=st.data())
def test_live_outputs_keep_their_values_and_never_share_memory(backend, small_min_bytes, data):
    """A random sequence of calls and drops: every live output (or a view of one) keeps its bits,
    equal to the result from fresh memory, and no two live outputs overlap."""
    xp = backend.xp
    live = []  # (array or view, expected NumPy values)
    steps = data.draw(st.lists(st.tuples(st.integers(0, len(SMALL_SHAPES) - 1), st.sampled_from(['gradient', 'softmax']),
                                         st.sampled_from(['keep', 'drop', 'keep a view', 'drop an older one'])),
                               min_size=1, max_size=8))
    problems = [_problem(case, seed, SMALL_SHAPES) for seed, (case, _, _) in enumerate(steps)]
    fresh = [_fresh(backend, op, *problem) for problem, (_, op, _) in zip(problems, steps)]
    for (x, label), expected, (case, op, then) in zip(problems, fresh, steps):
        out = _call(backend, op, x, label)
        assert backend.to_numpy(out).tobytes() == expected.tobytes()
        if then == 'keep':
            live.append((out, expected))
        elif then == 'keep a view':
            live.append((out[1:, ::3], expected[1:, ::3]))
        elif then == 'drop an older one' and live:
            live.pop(data.draw(st.integers(0, len(live) - 1)))
        del out  # freed at once (no cycles): its buffer is back in the cache for the next step
        for i, (kept, values) in enumerate(live):
            assert backend.to_numpy(kept).tobytes() == numpy.ascontiguousarray(values).tobytes()
            for other, _ in live[:i]:
                assert not xp.shares_memory(kept, other)


def test_a_dropped_output_serves_the_next_one_of_its_size(numpy_backend):
    x, label = _problem(0, 1)
    first = _call(numpy_backend, 'gradient', x, label)
    address = first.ctypes.data
    del first
    assert _output_cache.cached_bytes() >= 64 * 4100 * 4
    x2, label2 = _problem(2, 2)  # float64, other shape, the same bytes
    second = _call(numpy_backend, 'gradient', x2, label2)
    assert second.ctypes.data == address
    assert second.dtype == numpy.float64 and second.shape == (32, 4100) and second.flags.c_contiguous
    assert second.flags.writeable and second.flags.aligned
    assert second.tobytes() == _fresh(numpy_backend, 'gradient', x2, label2).tobytes()


def test_small_outputs_and_a_zero_limit_bypass_the_cache(numpy_backend):
    small = _call(numpy_backend, 'gradient', *_problem(3, 1))  # 32 KB: below MIN_BYTES
    del small
    gc.collect()
    assert _output_cache.cached_bytes() == 0
    cupy_sce.set_output_cache_limit(0)
    big = _call(numpy_backend, 'gradient', *_problem(0, 1))
    del big
    gc.collect()
    assert _output_cache.cached_bytes() == 0
    assert cupy_sce.get_output_cache_limit() == 0


def test_the_cache_keeps_to_its_limit_and_release_scratch_empties_it(numpy_backend):
    size = 64 * 4100 * 4
    cupy_sce.set_output_cache_limit(2 * size + 10)
    outputs = [_call(numpy_backend, 'gradient', *_problem(0, seed)) for seed in range(4)]
    del outputs
    gc.collect()
    assert _output_cache.cached_bytes() == 2 * size  # the two oldest were dropped
    cupy_sce.set_output_cache_limit(size)
    assert _output_cache.cached_bytes() == size
    cupy_sce.release_scratch()
    assert _output_cache.cached_bytes() == 0


def test_a_failed_call_returns_its_output_buffer(numpy_backend):
    x, label = _problem(0, 1)
    label[5, 0] = 4100  # out of range: the call raises after taking its gradient buffer
    try:  # not pytest.raises: its traceback would keep the call's frames, and the buffer, alive
        _call(numpy_backend, 'gradient', x, label)
    except IndexError:
        pass
    else:
        pytest.fail('a bad label did not raise')
    gc.collect()
    assert _output_cache.cached_bytes() == 64 * 4100 * 4  # back in the cache, not leaked
    ok = _call(numpy_backend, 'gradient', *_problem(0, 2))
    assert ok.tobytes() == _fresh(numpy_backend, 'gradient', *_problem(0, 2)).tobytes()


def test_threads_dropping_and_taking_outputs(numpy_backend):
    """Four threads compute and drop outputs of the cached sizes at once (the outputs' __del__ runs
    in whichever thread drops them): every result is right and the cache stays within its limit."""
    expected = {(case, seed): _fresh(numpy_backend, 'gradient', *_problem(case, seed))
                for case in range(3) for seed in range(3)}
    cupy_sce.set_output_cache_limit(3 * 64 * 4100 * 4)
    errors = []

    def work(thread):
        try:
            held = []
            for i in range(12):
                key = ((thread + i) % 3, i % 3)
                grad = cupy_sce.forward_backward(*_problem(*key))[1]
                held.append((grad, key))
                if len(held) > 2:
                    old, old_key = held.pop(0)
                    if old.tobytes() != expected[old_key].tobytes():
                        errors.append((thread, i, old_key))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    with numpy_backend.active():  # the kernel choice is global: set once, around the threads
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert _output_cache.cached_bytes() <= cupy_sce.get_output_cache_limit()


@pytest.mark.parametrize('value', [-1, 1.5, True, '1024'])
def test_set_output_cache_limit_rejects_bad_values(value):
    with pytest.raises(ValueError, match='nbytes'):
        cupy_sce.set_output_cache_limit(value)
