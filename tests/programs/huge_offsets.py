"""64-bit offsets on huge sparse buffers: launches only the far blocks of huge grids on the host
harness and checks their rows against NumPy (run by tests/test_kernels.py in a process of its
own, since it maps buffers of several GiB whose untouched pages cost nothing).

Prints one ``ok ...`` line per case; exits non-zero on the first failure.
"""
import mmap

import numpy

from cupy_sce import _cupy_backend, _kernels
from cupy_sce.testing import harness


def sparse(n_elements, dtype):
    """A huge array whose untouched pages cost nothing (MAP_NORESERVE)."""
    dtype = numpy.dtype(dtype)
    buf = mmap.mmap(-1, n_elements * dtype.itemsize,
                    flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, 'MAP_NORESERVE', 0x4000))
    return numpy.frombuffer(buf, dtype)


def check(dtype, outer, K, inner, block_rows):
    """Run only the far blocks of the grid and compare their rows with NumPy."""
    n_rows = outer * inner
    vec = _kernels.vector_width(dtype) if inner == 1 and K % _kernels.vector_width(dtype) == 0 else 1
    group = _cupy_backend.group_size_for(K, inner, vec)
    grid, block = _cupy_backend.launch_geometry(n_rows, inner, group)
    columns = inner != 1 and group > 1
    rows_per_block = 32 if columns else block // group
    assert outer * K * inner > 2 ** 31
    x = sparse(outer * K * inner, dtype)
    label = numpy.zeros(n_rows, numpy.int64)
    loss = numpy.zeros(n_rows, numpy.float32)
    lse = numpy.zeros(n_rows, numpy.float32)
    grad = sparse(outer * K * inner, dtype)
    bad = numpy.full(1, numpy.iinfo(numpy.uint64).max, numpy.uint64)
    blocks = [grid - 1]
    rows = range((grid - 1) * rows_per_block, min(grid * rows_per_block, n_rows))
    rng = numpy.random.default_rng(0)
    for r in rows:
        base = (r // inner) * K * inner + r % inner
        idx = base + numpy.arange(K) * inner
        x[idx] = rng.standard_normal(K)
        label[r] = rng.integers(0, K)
    label[rows[-1]] = K  # out of range: must be reported for exactly this row
    null = numpy.uint64(0)
    zero = numpy.float32(0)
    args = (x, label, null, null, null, null, null, loss, lse, null, grad, numpy.int64(n_rows),
            numpy.int64(K), numpy.int64(inner), numpy.int64(-100), zero, zero, zero, numpy.int32(group), bad)
    shared = _cupy_backend.shared_mem_bytes(dtype, K, inner, group)
    name = _kernels.rows_name(dtype, 'long long', 'forward_backward', 0, vec, False)
    harness.launch(name, grid, block, args, shared_mem=shared, blocks=blocks)
    assert int(bad[0]) == rows[-1], (int(bad[0]), rows[-1])
    for r in rows[:-1]:
        base = (r // inner) * K * inner + r % inner
        idx = base + numpy.arange(K) * inner
        xr = x[idx].astype(numpy.float64)
        ref_lse = numpy.logaddexp.reduce(xr)
        assert abs(lse[r] - ref_lse) < 1e-3 * max(1, abs(ref_lse)), (r, lse[r], ref_lse)
        assert abs(float(loss[r]) - (ref_lse - xr[label[r]])) < 2e-2, r
        g = numpy.exp(xr - ref_lse)
        g[label[r]] -= 1
        assert numpy.allclose(grad[idx].astype(numpy.float64), g, atol=2e-3), r
    print('ok', numpy.dtype(dtype).name, outer, K, inner, 'rows', rows[0], '..', rows[-1])


def main():
    check(numpy.float32, 8200, 262144, 1, 1)       # contiguous rows: row * K > 2**31 (block per row)
    check(numpy.float16, 2, 3, 2 ** 30 + 7, 256)   # strided: (row / inner) * K * inner + k * inner > 2**31
    check(numpy.float16, 2, 40, 2 ** 26 + 3, 32)   # strided with 4 warps per 32 rows (columns)
    check(numpy.float16, 70000, 32768, 1, 1)       # 2**31 < row * K < 2**32: caught if unsigned 32-bit


if __name__ == '__main__':
    main()
