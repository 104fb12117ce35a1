"""CuPy backend: picks a kernel variant and launch geometry, packs arguments, launches.

The functions mirror ``_numpy_backend`` one for one (same names, same
``_Problem`` argument, same return values).  The kernels are in
``kernels/sce.cu``; ``_kernels`` compiles them.

The backend talks to the device only through a *runtime* (array module,
kernel lookup, pointer addresses, a device-to-host read), so that
``cupy_sce.testing.harness`` can run this very host logic with NumPy arrays
and the kernels compiled for the CPU.
"""
import typing

import numpy

from cupy_sce import _kernels

# Launch geometry by the number of vector chunks in a row (K / VEC): the smallest entry that
# holds it gives the threads per row.  None means about CHUNKS_PER_THREAD chunks per thread
# (the next power of two >= chunks / CHUNKS_PER_THREAD): short rows get few threads, since the
# shuffles that merge a row's partial states cost more than the loads they would split.
#   <= 512 chunks  : a thread (K = 10: no shuffles at all) up to a warp per row
#   <= 1024 chunks : a warp per row (<= 32 chunks per lane)
#   larger         : a block of 256 threads per row: several small blocks per SM overlap one
#                    row's reduction with another's loads (256 beat 512 and 1024 on an H200,
#                    docs/performance.md)
GROUP_TABLE = ((512, None), (1024, 32), (float('inf'), 256))
CHUNKS_PER_THREAD = 16
# Strided rows (inner > 1): COLUMN_ROWS rows per block, one per lane, and up to COLUMN_SLICES
# warps that split the classes (about CHUNKS_PER_THREAD classes a thread at least); with one
# slice, a thread per row.
COLUMN_ROWS = 32  # SCE_COLUMN_ROWS in kernels/sce.cu (the harness reports it; a test compares)
COLUMN_SLICES = 8
# Block size when several rows share a block (group size <= 32).
ROWS_BLOCK = 256
# Dynamic shared memory a launch may use without opting in (cudaFuncAttributeMaxDynamicShared...).
OPT_IN_ABOVE = 48 * 1024
# The row cache (CACHE_ROW) is used when the block's rows fit in SHARED_LIMIT (tune_gpu.py tries
# the opt-in maximum).
SHARED_LIMIT = OPT_IN_ABOVE
# RowState<A> (kernels/sce_common.cuh): SCE_STATE_FIELDS values of A; STATE_SLOTS of them (warp
# partials and the cluster slot, SCE_STATE_SLOTS) precede the row cache.  Checked against the
# compiled code by a test.
STATE_FIELDS = 6
STATE_SLOTS = 33
# With USE_CLUSTERS, a row (a block per row) whose cache does not fit SHARED_LIMIT is split over
# a thread block cluster (sm_90) of the smallest size whose per-CTA segment fits
# CLUSTER_SEGMENT_LIMIT (three such CTAs share an SM's 228 KiB), else the opt-in maximum: one
# read of the row instead of two.  Each CTA has CLUSTER_BLOCK threads.  Off by default: measured
# slower than re-reading except for float32 at K = 128256 (docs/performance.md); with a row split
# into cached segments each CTA alternates between reading and writing, and three CTAs per SM
# keep too few loads in flight.  The featureless kernels have cluster variants; they are
# compiled, executed on the CPU and on a GPU by the tests.
USE_CLUSTERS = False
CLUSTER_SEGMENT_LIMIT = 64 * 1024
CLUSTER_BLOCK = 256
# Launch plans a backend keeps (see CupyBackend._plan); a training loop has a handful of shapes.
PLAN_CACHE_SIZE = 1024
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

    def bad_row_buffer(self):
        """The label check's one-element uint64 buffer, holding NO_BAD_ROW (every bit set): a
        pool allocation and an asynchronous memset (cupy.full's fill kernel took tens of us of
        host time a call)."""
        cupy = self.xp
        buffer = cupy.empty((1,), numpy.uint64)
        cupy.cuda.runtime.memsetAsync(buffer.data.ptr, 0xFF, 8, cupy.cuda.get_current_stream().ptr)
        return buffer

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
    if inner != 1 and group > 1:  # columns: COLUMN_ROWS rows per block
        return -(-n_rows // COLUMN_ROWS), COLUMN_ROWS * group
    block = group if group > 32 else ROWS_BLOCK
    return -(-n_rows // (block // group)), block


def _state_bytes(dtype):
    """sizeof(RowState<A>) for logits of ``dtype``."""
    return STATE_FIELDS * (8 if numpy.dtype(dtype) == numpy.float64 else 4)


def state_area_bytes(dtype):
    """Bytes of the STATE_SLOTS row states ahead of the row cache, rounded up to 16 (the cache
    holds 16-byte vectors); the kernels' sce::state_area_bytes."""
    return -(-STATE_SLOTS * _state_bytes(dtype) // 16) * 16


def shared_mem_bytes(dtype, K, inner, group, cache_row=False, cluster=1, vec=1):
    """Dynamic shared memory of a cupy_sce_rows launch: the partials of the block reduction
    (RowState<A>), and the row cache: the block's rows, or with a cluster this CTA's segment of
    ceil(K / vec / cluster) vectors."""
    dtype = numpy.dtype(dtype)
    state_bytes = _state_bytes(dtype)
    if cluster > 1:
        return state_area_bytes(dtype) + -(-(K // vec) // cluster) * vec * dtype.itemsize
    if inner != 1 and group > 1:  # columns: a partial per thread
        return COLUMN_ROWS * group * state_bytes
    if cache_row:
        block = launch_geometry(1, 1, group)[1]
        return state_area_bytes(dtype) + (block // group) * K * dtype.itemsize
    return (group // 32) * state_bytes if group > 32 else 0


class LaunchPlan(typing.NamedTuple):
    """One launch of cupy_sce_rows (or cupy_sce_rows_cluster)."""
    name: str
    grid: int
    block: int
    shared_mem: int
    group: int       # threads per row (the kernel's group_size argument)
    cache_row: bool
    cluster: int     # CTAs per thread block cluster (1: none)


def launch_plan(dtype, label_type, op, features, n_rows, K, inner, vec, clusters=(False, 0)):
    """The launch of operation ``op`` (a key of ``_kernels.OPS``) with feature bits ``features``
    over ``n_rows`` rows of K classes ``inner`` apart, read ``vec`` elements at a time.  Pure:
    ``clusters`` is the device's (thread block clusters available, opt-in shared memory)."""
    group = group_size_for(K, inner, vec)
    # One read of each row: keep it in shared memory for pass 2 when pass 1 reads x and pass 2
    # re-reads it (softmax, gradient or soft loss), and the block's rows fit.
    cacheable = inner == 1 and _kernels._cacheable(op, label_type)
    cache_row = cacheable and shared_mem_bytes(dtype, K, inner, group, True) <= SHARED_LIMIT
    cluster = 1
    if USE_CLUSTERS and cacheable and not cache_row and group > 32 and features == 0 and clusters[0]:
        # a cluster splits one row, so only where a row has a block of its own
        cluster = _cluster_size(dtype, K, vec, clusters[1])
    if cluster > 1:  # a row per cluster, each CTA caching its segment
        group = CLUSTER_BLOCK
        name = _kernels.cluster_name(dtype, label_type, op, features, vec, cluster)
    else:
        name = _kernels.rows_name(dtype, label_type, op, features, vec, cache_row)
    grid, block = launch_geometry(n_rows, inner, group, cluster)
    return LaunchPlan(name, grid, block, shared_mem_bytes(dtype, K, inner, group, cache_row, cluster, vec),
                      group, cache_row or cluster > 1, cluster)


def _cluster_size(dtype, K, vec, optin):
    """CTAs per cluster for a row cache that does not fit one block's SHARED_LIMIT (1: none)."""
    for limit in (min(CLUSTER_SEGMENT_LIMIT, optin), optin):
        for cluster in _kernels.CLUSTER_SIZES:
            if shared_mem_bytes(dtype, K, 1, CLUSTER_BLOCK, cluster=cluster, vec=vec) <= limit:
                return cluster
    return 1


class CupyBackend:
    """Backend interface (see ``_numpy_backend``) on CUDA kernels."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.xp = runtime.xp
        self._plans = {}

    # ---------------------------------------------------------------- launch helpers

    def _execute(self, p, plan, args):
        """Run a launch plan (nothing to do without rows)."""
        if p.outer * p.inner == 0:
            return
        kernel = self.runtime.kernel(p.dtype, plan.name)
        if plan.shared_mem > OPT_IN_ABOVE and kernel.max_dynamic_shared_size_bytes < plan.shared_mem:
            kernel.max_dynamic_shared_size_bytes = plan.shared_mem  # the opt-in
        kernel((plan.grid,), (plan.block,), args, shared_mem=plan.shared_mem)

    def _simple_plan(self, p, name, group):
        grid, block = launch_geometry(p.outer * p.inner, p.inner, group)
        return LaunchPlan(name, grid, block, shared_mem_bytes(p.dtype, p.K, p.inner, group), group, False, 1)

    def _bad_row_buffer(self, p):
        if p.label is None or p.soft_label or not p.check_labels:
            return None
        return self.runtime.bad_row_buffer()

    def _bad_row(self, buf):
        if buf is None:
            return None
        bad = self.runtime.read_scalar(buf)
        return None if bad == NO_BAD_ROW else bad

    @staticmethod
    def _label_type(p):
        if p.soft_label:
            return _kernels.ACC_TYPE[_kernels.cuda_type(p.dtype)]
        return _kernels.LABEL_TYPE[p.label.dtype]

    @staticmethod
    def _ptr(array):
        return NULL if array is None else array

    def _rows(self, p, op, x=None, softmax_in=None, lse_in=None, loss_grad=None, loss=None, lse=None,
              softmax=None, grad=None):
        """Launch cupy_sce_rows for operation ``op`` with the problem's features and the given
        inputs/outputs (others null)."""
        labelled = op != 'lse'
        features = p.features if op in _kernels.FEATURE_OPS else 0
        bad_buf = self._bad_row_buffer(p) if labelled else None
        vec, staged = self._stage_misaligned(p, dict(x=x, softmax_in=softmax_in, softmax=softmax, grad=grad))
        x, softmax_in, softmax, grad = (staged[name][0] for name in ('x', 'softmax_in', 'softmax', 'grad'))
        label_type = self._label_type(p) if labelled else 'int'
        clusters = self.runtime.limits() if USE_CLUSTERS else (False, 0)
        plan = self._plan(p.dtype, label_type, op, features, p.outer * p.inner, p.K, p.inner, vec, clusters)
        acc = p.acc_dtype.type
        args = tuple(self._ptr(a) for a in (x, p.label if labelled else None, softmax_in, lse_in, loss_grad,
                                            p.weight if features & _kernels.F_WEIGHT else None,
                                            p.weight_sum if features & _kernels.F_WEIGHT else None,
                                            loss, lse, softmax, grad))
        args += (numpy.int64(p.outer * p.inner), numpy.int64(p.K), numpy.int64(p.inner),
                 numpy.int64(p.ignore_index), acc(p.label_smoothing), acc(p.z_loss), acc(p.softcap or 0),
                 numpy.int32(plan.group), self._ptr(bad_buf))
        self._execute(p, plan, args)
        for name in ('softmax', 'grad'):
            buffer, caller = staged[name]
            if buffer is not caller:
                caller[...] = buffer
        return self._bad_row(bad_buf)

    def _stage_misaligned(self, p, arrays):
        """(vector width, {name: (array to launch with, caller's array)}).

        Rows take 16-byte vectors when they are contiguous and K is a multiple of the vector.
        Then a caller's T array that does not start on 16 bytes (a view at an odd offset) is
        staged in a fresh, aligned copy (outputs are copied back after the launch; in place, x and
        grad share the copy): a row's summation order depends on the vector width, so without
        this a row's bits would depend on where the caller's buffer starts."""
        staged = {name: (a, a) for name, a in arrays.items()}
        width = _kernels.vector_width(p.dtype)
        if p.inner != 1 or p.K % width:
            return 1, staged
        copies = {}
        for name, a in arrays.items():
            if a is None or self.runtime.address(a) % 16 == 0:
                continue
            key = id(a)
            if key not in copies:
                copies[key] = self.xp.empty_like(a)
                if self.runtime.address(copies[key]) % 16:  # pragma: no cover - allocators align to 16+
                    return 1, {name: (a, a) for name, a in arrays.items()}
                if name in ('x', 'softmax_in') or a is arrays['x']:  # read by the kernel
                    copies[key][...] = a
            staged[name] = (copies[key], a)
        return width, staged

    def _plan(self, *args):
        """``launch_plan(*args)``, cached: the plan is a pure function of its arguments and of the
        module's tuning constants (which tests and tune_gpu.py may change: they are part of the
        key), and computing it is a good part of a small call's host time."""
        key = args + (GROUP_TABLE, CHUNKS_PER_THREAD, COLUMN_SLICES, ROWS_BLOCK, SHARED_LIMIT, USE_CLUSTERS,
                      CLUSTER_SEGMENT_LIMIT, CLUSTER_BLOCK, group_size_for, launch_geometry, shared_mem_bytes)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= PLAN_CACHE_SIZE:
                self._plans.clear()
            plan = self._plans[key] = launch_plan(*args)
        return plan

    # ---------------------------------------------------------------- backend interface

    def row_max(self, p):
        out = self.xp.empty((p.outer, p.inner), p.acc_dtype)
        vec, staged = self._stage_misaligned(p, dict(x=p.x))
        # cupy_sce_row_max has no column layout: a thread per strided row
        group = group_size_for(p.K, p.inner, vec) if p.inner == 1 else 1
        args = (staged['x'][0], out, numpy.int64(p.outer * p.inner), numpy.int64(p.K), numpy.int64(p.inner),
                numpy.int32(group))
        self._execute(p, self._simple_plan(p, _kernels.row_max_name(p.dtype, vec), group), args)
        return out

    def logsumexp(self, p):
        out = self.xp.empty((p.outer, p.inner), p.acc_dtype)
        self._rows(p, 'lse', x=p.x, lse=out)
        return out

    def gather_label_logit(self, p):
        """Returns ``(picked, bad_row)`` like the NumPy backend."""
        out = self.xp.empty((p.outer, p.inner), p.acc_dtype)
        bad_buf = self._bad_row_buffer(p)
        args = (p.x, p.label, out, numpy.int64(p.outer * p.inner), numpy.int64(p.K),
                numpy.int64(p.inner), numpy.int64(p.ignore_index), self._ptr(bad_buf))
        name = _kernels.gather_name(p.dtype, _kernels.LABEL_TYPE[p.label.dtype])
        # one thread per row: group size 1 with the rows-per-block geometry
        self._execute(p, self._simple_plan(p, name, 1), args)
        return out, self._bad_row(bad_buf)

    def first_bad_label(self, p):
        """The first row with a bad hard label, or None (the check before an in-place call): the
        gather kernel's range check."""
        return self.gather_label_logit(p)[1]

    def forward_out(self, p, loss, lse, softmax):
        """``loss`` (rows, compute dtype), ``lse`` (may be None), ``softmax`` (None, or only
        without features: Paddle's op)."""
        if softmax is not None:
            return self._rows(p, 'forward_softmax', x=p.x, loss=loss, lse=lse, softmax=softmax)
        return self._rows(p, 'forward', x=p.x, loss=loss, lse=lse)

    def backward_out(self, p, loss_grad, lse, softmax, grad):
        if softmax is not None:
            return self._rows(p, 'backward_softmax', softmax_in=softmax, loss_grad=loss_grad, grad=grad)
        return self._rows(p, 'backward_lse', x=p.x, lse_in=lse, loss_grad=loss_grad, grad=grad)

    def forward_backward_out(self, p, loss_grad, loss, grad):
        return self._rows(p, 'forward_backward', x=p.x, loss_grad=loss_grad, loss=loss, grad=grad)
