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
# holds it gives the threads per row.  None means about CHUNKS_PER_THREAD chunks per thread
# (the next power of two >= chunks / CHUNKS_PER_THREAD): short rows get few threads, since the
# shuffles that merge a row's partial states cost more than the loads they would split.
#   <= 512 chunks  : a thread (K = 10: no shuffles at all) up to a warp per row
#   <= 1024 chunks : a warp per row (<= 32 chunks per lane)
#   larger         : a block of 256 threads per row.  On an H200 (scripts/tune_gpu.py) 256
#                    beat 512 and 1024 threads per row at K = 128256: float16 forward 0.64 ms
#                    against 0.91 ms; several small blocks per SM overlap one row's reduction
#                    with another's loads.
GROUP_TABLE = ((512, None), (1024, 32), (float('inf'), 256))
CHUNKS_PER_THREAD = 16
# Strided rows (inner > 1): 32 rows per block, one per lane, and up to COLUMN_SLICES warps that
# split the classes (about CHUNKS_PER_THREAD classes a thread at least); with one slice, a thread
# per row.  One thread per row left a (64, 1000, 256) axis=1 problem with 16384 threads in all.
COLUMN_SLICES = 8
# Block size when several rows share a block (group size <= 32), and for the strided layout.
ROWS_BLOCK = 256
# Dynamic shared memory a launch may use without opting in (cudaFuncAttributeMaxDynamicShared...):
# the row cache (CACHE_ROW) is used when the block's rows fit in it.
SHARED_LIMIT = 48 * 1024
STATE_SLOTS = 33  # RowState<A> slots ahead of the row cache (SCE_STATE_SLOTS in kernels/sce.cu)
# With USE_CLUSTERS, a row (a block per row) whose cache does not fit SHARED_LIMIT is split over
# a thread block cluster (sm_90) of the smallest size whose per-CTA segment fits
# CLUSTER_SEGMENT_LIMIT (three such CTAs share an SM's 228 KiB), else the opt-in maximum: one
# read of the row instead of two.  Each CTA has CLUSTER_BLOCK threads.  Off by default: on an
# H200 (scripts/tune_gpu.py, 2026-11-28, 8192 x 128256 fused forward+backward, median of 5
# interleaved rounds) clusters took 2.99 ms against 3.20 ms re-reading in float32 but 2.16 ms
# against 1.69 ms in float16, and at 4096 x 32000 the rounds spread too wide to rank them: with a
# row split into cached segments each CTA alternates between reading and writing, and three CTAs
# per SM keep too few loads in flight.  The kernels are compiled, executed on the CPU and on a
# GPU by the tests.
USE_CLUSTERS = False
CLUSTER_SEGMENT_LIMIT = 64 * 1024
CLUSTER_BLOCK = 256
NO_BAD_ROW = numpy.iinfo(numpy.uint64).max
NULL = numpy.uint64(0)  # a null pointer argument (8 bytes of zeros)


class CupyRuntime:
    """The real device: CuPy arrays and NVRTC-compiled kernels."""

    def __init__(self):
        import cupy
        self.xp = cupy
        self._limits = {}

    def kernel(self, dtype, name):
        return _kernels.get_function(dtype, name)

    @staticmethod
    def address(array):
        return array.data.ptr

    @staticmethod
    def read_scalar(array):
        return int(array.get()[0])  # the one tiny device-to-host copy of the label check

    def limits(self):
        """(thread block clusters available, opt-in dynamic shared memory per block) of the current device."""
        device = self.xp.cuda.Device()
        found = self._limits.get(device.id)
        if found is None:
            found = self._limits[device.id] = (int(device.compute_capability) >= 90,
                                               int(device.attributes['MaxSharedMemoryPerBlockOptin']))
        return found


def _next_pow2(n):
    return 1 << (max(1, n) - 1).bit_length()


def group_size_for(K, inner, vec):
    """Threads per row for rows of K classes, ``inner`` apart, read ``vec`` at a time (strided
    rows: the warps that split a row's classes)."""
    if inner != 1:
        return min(COLUMN_SLICES, _next_pow2(-(-K // CHUNKS_PER_THREAD)))
    chunks = max(1, -(-K // vec))
    for limit, group in GROUP_TABLE:
        if chunks <= limit:
            return group if group is not None else _next_pow2(-(-chunks // CHUNKS_PER_THREAD))
    raise AssertionError('unreachable')


def launch_geometry(n_rows, inner, group, cluster=1):
    """(grid, block) of a launch over n_rows rows with ``group`` threads per row (see
    group_size_for; with a cluster, a row per cluster of ``cluster`` blocks of ``group``)."""
    if cluster > 1:
        return n_rows * cluster, group
    if inner != 1 and group > 1:  # columns: 32 rows per block
        return -(-n_rows // 32), 32 * group
    block = group if group > 32 else ROWS_BLOCK
    return -(-n_rows // (block // group)), block


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
    def _shared_mem(p, group, cache_row=False, cluster=1, vec=1):
        """Partials of the block reduction (RowState<A> is 4 values of A), and the row cache: the
        block's rows, or with a cluster this CTA's segment of ceil(K / vec / cluster) vectors."""
        state_bytes = 4 * p.acc_dtype.itemsize
        if cluster > 1:
            return STATE_SLOTS * state_bytes + -(-(p.K // vec) // cluster) * vec * p.dtype.itemsize
        if p.inner != 1 and group > 1:  # columns: a partial per thread
            return 32 * group * state_bytes
        if cache_row:
            block = launch_geometry(1, 1, group)[1]
            return STATE_SLOTS * state_bytes + (block // group) * p.K * p.dtype.itemsize
        return (group // 32) * state_bytes if group > 32 else 0

    def _cluster_size(self, p, vec):
        """CTAs per cluster for a row cache that does not fit one block's SHARED_LIMIT (1: none)."""
        if not USE_CLUSTERS:
            return 1
        clusters, optin = self.runtime.limits()
        if not clusters:
            return 1
        for limit in (min(CLUSTER_SEGMENT_LIMIT, optin), optin):
            for cluster in _kernels.CLUSTER_SIZES:
                if self._shared_mem(p, CLUSTER_BLOCK, cluster=cluster, vec=vec) <= limit:
                    return cluster
        return 1

    def _launch(self, p, name, args, group, shared_mem=None, cluster=1):
        """Launch ``name`` over all rows of ``p``, ``group`` threads per row (with a cluster: a row
        per cluster of ``cluster`` blocks of ``group`` threads)."""
        n_rows = p.outer * p.inner
        if n_rows == 0:
            return
        grid, block = launch_geometry(n_rows, p.inner, group, cluster)
        if shared_mem is None:
            shared_mem = self._shared_mem(p, group)
        kernel = self.runtime.kernel(p.dtype, name)
        if shared_mem > SHARED_LIMIT and kernel.max_dynamic_shared_size_bytes < shared_mem:
            kernel.max_dynamic_shared_size_bytes = shared_mem  # the opt-in
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
        """Launch ``cupy_sce_fused_rows`` (or ``cupy_sce_fused_cluster``) with the given
        inputs/outputs (others null)."""
        bad_buf = self._bad_row_buffer(p) if label is not None else None
        vec = self._vec(p, x, softmax_in, softmax, grad)
        label_type = self._label_type(p) if label is not None else 'int'
        n_rows = p.outer * p.inner
        group = group_size_for(p.K, p.inner, vec)
        # One read of each row: keep it in shared memory for pass 2 when pass 1 reads x and pass 2
        # re-reads it (softmax, gradient or soft loss), and the block's rows fit.
        pass2 = softmax is not None or grad is not None or (p.soft_label and loss is not None)
        cacheable = p.inner == 1 and x is not None and lse_in is None and softmax_in is None and pass2
        cache_row = cacheable and self._shared_mem(p, group, True) <= SHARED_LIMIT
        # a cluster splits one row, so only where a row has a block of its own
        cluster = self._cluster_size(p, vec) if cacheable and not cache_row and group > 32 else 1
        if cluster > 1:  # a row per cluster, each CTA caching its segment
            group = CLUSTER_BLOCK
            name = _kernels.cluster_name(p.dtype, label_type, vec, cluster)
        else:
            name = _kernels.fused_name(p.dtype, label_type, vec, cache_row)
        args = tuple(self._ptr(a) for a in (x, label, softmax_in, lse_in, loss_grad, loss, lse,
                                            softmax, grad))
        args += (numpy.int64(n_rows), numpy.int64(p.K), numpy.int64(p.inner),
                 numpy.int64(p.ignore_index), numpy.int32(group), self._ptr(bad_buf))
        self._launch(p, name, args, group, self._shared_mem(p, group, cache_row, cluster, vec), cluster)
        return self._bad_row(bad_buf)

    # ---------------------------------------------------------------- backend interface

    def row_max(self, p):
        out = self.xp.empty((p.outer, p.inner), p.acc_dtype)
        vec = self._vec(p, p.x)
        # cupy_sce_row_max has no column layout: a thread per strided row
        group = group_size_for(p.K, p.inner, vec) if p.inner == 1 else 1
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
