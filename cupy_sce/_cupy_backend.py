"""CuPy backend: picks a kernel variant and launch geometry, packs arguments, launches.

The functions mirror ``_numpy_backend`` one for one (same names, same
``_Problem`` argument, same return values).  The kernels are in
``kernels/sce.cu``; ``_kernels`` compiles them.

The backend talks to the device only through a *runtime* (array module,
kernel lookup, pointer addresses, a device-to-host read), so that
``cupy_sce.testing.harness`` can run this very host logic with NumPy arrays
and the kernels compiled for the CPU.
"""
import numpy

from cupy_sce import _kernels

# Launch geometry by the number of vector chunks in a row (K / VEC): the smallest entry that
# holds it gives the threads per row.  None means the next power of two >= chunks.
#   <= 32 chunks   : part of a warp per row, several rows per block
#   <= 1024 chunks : a warp per row (<= 32 chunks per lane)
#   <= 8192 chunks : a block of 256 threads per row
#   larger         : a block of 1024 threads per row
GROUP_TABLE = ((32, None), (1024, 32), (8192, 256), (float('inf'), 1024))
# Block size when several rows share a block (group size <= 32), and for the strided layout.
ROWS_BLOCK = 256
# Dynamic shared memory a launch may use without opting in (cudaFuncAttributeMaxDynamicShared...):
# the row cache (CACHE_ROW) is used when the block's rows fit in it.
SHARED_LIMIT = 48 * 1024
WARP_PARTIALS = 32  # RowState<A> slots reserved ahead of the row cache (kernels/sce.cu)
NO_BAD_ROW = numpy.iinfo(numpy.uint64).max
NULL = numpy.uint64(0)  # a null pointer argument (8 bytes of zeros)


class CupyRuntime:
    """The real device: CuPy arrays and NVRTC-compiled kernels."""

    def __init__(self):
        import cupy
        self.xp = cupy

    def kernel(self, dtype, name):
        return _kernels.get_function(dtype, name)

    @staticmethod
    def address(array):
        return array.data.ptr

    @staticmethod
    def read_scalar(array):
        return int(array.get()[0])  # the one tiny device-to-host copy of the label check


def group_size_for(K, inner, vec):
    """Threads per row for rows of K classes, ``inner`` apart, read ``vec`` at a time."""
    if inner != 1:
        return 1  # a thread per row: neighbouring threads read neighbouring addresses
    chunks = max(1, -(-K // vec))
    for limit, group in GROUP_TABLE:
        if chunks <= limit:
            return group if group is not None else 1 << (chunks - 1).bit_length()
    raise AssertionError('unreachable')


class CupyBackend:
    """Backend interface (see ``_numpy_backend``) on CUDA kernels."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.xp = runtime.xp

    # ---------------------------------------------------------------- launch helpers

    def _vec(self, p, *arrays):
        """16-byte vectors when rows are contiguous, K divides, and every T array is aligned."""
        vec = _kernels.vector_width(p.dtype)
        if p.inner != 1 or p.K % vec:
            return 1
        if any(a is not None and self.runtime.address(a) % 16 for a in arrays):
            return 1
        return vec

    @staticmethod
    def _block(group):
        return group if group > 32 else ROWS_BLOCK

    @classmethod
    def _shared_mem(cls, p, group, cache_row=False):
        """Warp partials of the block reduction (RowState<A> is 4 values of A), and the row cache."""
        state_bytes = 4 * p.acc_dtype.itemsize
        if cache_row:
            return WARP_PARTIALS * state_bytes + (cls._block(group) // group) * p.K * p.dtype.itemsize
        return (group // 32) * state_bytes if group > 32 else 0

    def _launch(self, p, name, args, group, shared_mem=None):
        """Launch ``name`` over all rows of ``p``, ``group`` threads per row."""
        n_rows = p.outer * p.inner
        if n_rows == 0:
            return
        block = self._block(group)
        grid = -(-n_rows // (block // group))
        if shared_mem is None:
            shared_mem = self._shared_mem(p, group)
        kernel = self.runtime.kernel(p.dtype, name)
        kernel((grid,), (block,), args, shared_mem=shared_mem)

    def _bad_row_buffer(self, p):
        if p.label is None or p.soft_label or not p.check_labels:
            return None
        return self.xp.full((1,), NO_BAD_ROW, dtype=numpy.uint64)

    def _bad_row(self, buf):
        if buf is None:
            return None
        bad = self.runtime.read_scalar(buf)
        return None if bad == NO_BAD_ROW else bad

    @staticmethod
    def _label_type(p):
        if p.soft_label:
            return _kernels.ACC_TYPE[_kernels.CUDA_TYPE[p.dtype]]
        return _kernels.LABEL_TYPE[p.label.dtype]

    @staticmethod
    def _ptr(array):
        return NULL if array is None else array

    def _fused(self, p, x=None, label=None, softmax_in=None, lse_in=None, loss_grad=None,
               loss=None, lse=None, softmax=None, grad=None):
        """Launch ``cupy_sce_fused_rows`` with the given inputs/outputs (others null)."""
        bad_buf = self._bad_row_buffer(p) if label is not None else None
        vec = self._vec(p, x, softmax_in, softmax, grad)
        label_type = self._label_type(p) if label is not None else 'int'
        n_rows = p.outer * p.inner
        group = group_size_for(p.K, p.inner, vec)
        # One read of each row: keep it in shared memory for pass 2 when pass 1 reads x and pass 2
        # re-reads it (softmax, gradient or soft loss), and the block's rows fit.
        pass2 = softmax is not None or grad is not None or (p.soft_label and loss is not None)
        cache_row = (p.inner == 1 and x is not None and lse_in is None and softmax_in is None and pass2
                     and self._shared_mem(p, group, True) <= SHARED_LIMIT)
        args = tuple(self._ptr(a) for a in (x, label, softmax_in, lse_in, loss_grad, loss, lse,
                                            softmax, grad))
        args += (numpy.int64(n_rows), numpy.int64(p.K), numpy.int64(p.inner),
                 numpy.int64(p.ignore_index), numpy.int32(group), self._ptr(bad_buf))
        self._launch(p, _kernels.fused_name(p.dtype, label_type, vec, cache_row), args, group,
                     self._shared_mem(p, group, cache_row))
        return self._bad_row(bad_buf)

    # ---------------------------------------------------------------- backend interface

    def row_max(self, p):
        out = self.xp.empty((p.outer, p.inner), p.acc_dtype)
        vec = self._vec(p, p.x)
        group = group_size_for(p.K, p.inner, vec)
        args = (p.x, out, numpy.int64(p.outer * p.inner), numpy.int64(p.K), numpy.int64(p.inner),
                numpy.int32(group))
        self._launch(p, _kernels.row_max_name(p.dtype, vec), args, group)
        return out

    def logsumexp(self, p):
        out = self.xp.empty((p.outer, p.inner), p.acc_dtype)
        self._fused(p, x=p.x, lse=out)
        return out

    def gather_label_logit(self, p):
        """Returns ``(picked, bad_row)`` like the NumPy backend."""
        out = self.xp.empty((p.outer, p.inner), p.acc_dtype)
        bad_buf = self._bad_row_buffer(p)
        args = (p.x, p.label, out, numpy.int64(p.outer * p.inner), numpy.int64(p.K),
                numpy.int64(p.inner), numpy.int64(p.ignore_index), self._ptr(bad_buf))
        name = _kernels.gather_name(p.dtype, _kernels.LABEL_TYPE[p.label.dtype])
        # one thread per row: group size 1 with the rows-per-block geometry
        self._launch(p, name, args, group=1)
        return out, self._bad_row(bad_buf)

    def forward_out(self, p, loss, lse, softmax):
        return self._fused(p, x=p.x, label=p.label, loss=loss, lse=lse, softmax=softmax)

    def backward_out(self, p, loss_grad, lse, softmax, grad):
        if softmax is not None:
            return self._fused(p, label=p.label, softmax_in=softmax, loss_grad=loss_grad, grad=grad)
        return self._fused(p, x=p.x, label=p.label, lse_in=lse, loss_grad=loss_grad, grad=grad)

    def forward_backward_out(self, p, loss_grad, loss, grad):
        return self._fused(p, x=p.x, label=p.label, loss_grad=loss_grad, loss=loss, grad=grad)
