"""The compiled CPU path: the NumPy backend's steps as one fused loop nest per row, built by numba.

The pure-NumPy tiles (``_numpy_backend``) pay for every step with a pass over the tile, and their
speed rides on NumPy's SIMD ``exp``, which is 2-4x slower on a host without AVX-512.  Here a row is
read by a few short loops while it sits in the core's cache: the exponentials and their sum (and
the row max first, only for a row whose unshifted sum is not safe; the sum of the logits for label
smoothing), then the gradient.  The exponential
is our own (``_exp``: Cody-Waite reduction and a polynomial, which LLVM vectorizes for whatever
SIMD the host has), so the speed does not hinge on AVX-512.

numba is an optional dependency (``pip install cupy_sce[cpu]``: wheels for every platform, no
compiler needed); the NumPy backend uses this path when numba imports and
``set_cpu_kernels('numpy')`` has not turned it off (``_numpy_backend.get_cpu_kernels``).  The kernels
compile once per compute dtype at first use and are cached on disk by numba.

What each row computes is what ``_numpy_backend`` computes (the same steps and special values:
``tests/test_cpu_kernels.py`` compares the two), in an order that depends on the row alone: the
sums are vectorized by LLVM with a fixed set of partial sums, so a row's bits do not
depend on its batch, tile, layout or thread count.  Soft labels and the soft cap stay on the
NumPy tiles (``_numpy_backend._compiled_for``).
"""
import threading
import warnings

import numba
import numpy
from llvmlite import ir
from numba import types
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import intrinsic, overload

from cupy_sce._numpy_backend import SMALL_K

# The operations of ``rows`` (one kernel, the operation chosen per call).
FORWARD, FORWARD_SOFTMAX, FORWARD_BACKWARD, BACKWARD_LSE, BACKWARD_SOFTMAX = range(5)
# A row's label in ``columns``: in range, equal to ignore_index, or neither.
VALID, IGNORED, BAD = range(3)
# Rows of at most this many classes go to ``columns`` (vectorized across rows), longer ones to
# ``rows`` (vectorized along the row): the NumPy backend's SMALL_K, whose tiles have that layout.
COLUMNS_MAX_K = SMALL_K
# ``columns`` takes a tile's rows in blocks of about this many elements (128 KiB of float32 logits,
# as much of exponentials: in a core's L2 cache between the steps), a multiple of LANE_ROWS rows.
COLUMNS_BLOCK = 32768
LANE_ROWS = 16
# ``rows`` asks for the lines of short rows (at most this many bytes) this far ahead of the row it
# works on, into L2: the hardware prefetcher alone left the forward at K = 1000 bound by the
# read plus the arithmetic, not the larger of the two (docs/performance.md, 2026-11-29 second entry).
PREFETCH_MAX_ROW_BYTES = 16384
PREFETCH_AHEAD_BYTES = 32768
CACHE_LINE_BYTES = 64

# FMA contraction only outside the sums: no reassociation (the careful forms stay as written) and IEEE
# semantics for NaN and inf, which are valid inputs (error_model='numpy': x / 0 is inf or NaN, as in NumPy).
_JIT = dict(nogil=True, cache=True, error_model='numpy', fastmath={'contract'})
# The sums may be reordered (vectorized): LLVM then keeps a fixed set of partial sums, so the order
# depends on K, the label's position and the host's SIMD width, never on the row's neighbours.
_OVERLOAD_JIT = dict(error_model='numpy', fastmath={'contract'})
_SUM_JIT = dict(nogil=True, cache=True, error_model='numpy', fastmath={'contract', 'reassoc'})


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float whose bit pattern is ``bits`` (int32 -> float32, int64 -> float64)."""
    if bits == types.int32:
        return types.float32(types.int32), lambda context, builder, sig, args: builder.bitcast(
            args[0], ir.FloatType())
    if bits == types.int64:
        return types.float64(types.int64), lambda context, builder, sig, args: builder.bitcast(
            args[0], ir.DoubleType())
    return None


@intrinsic
def _prefer_wide_vectors(typingctx):
    """Let LLVM vectorize the calling function with the host's widest registers.

    LLVM's tuning for AVX-512 server cores prefers 256-bit vectors (its ``prefer-256-bit``
    tuning, against the clock drop of 512-bit arithmetic on older cores); the loops here are bound
    by the exponential's arithmetic when their row is in cache, and 512-bit vectors took them from
    0.42 to 0.31 ns an element at K = 32000 on the Xeon of docs/performance.md.  The function
    attribute ``prefer-vector-width`` is a per-function preference: a host without AVX-512 still
    gets 256-bit vectors.  Every function with a hot loop calls this (LLVM may inline one into
    another, and the loop then takes its caller's preference)."""
    def codegen(context, builder, sig, args):
        # llvmlite's FunctionAttributes accepts only its list of names, and writes each into the IR
        # as it is: a string attribute goes in past the check (a set's own add).  Only a hint: an
        # llvmlite that stores attributes otherwise gets none.
        if isinstance(builder.function.attributes, set):
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def _prefetch_to_l2(typingctx, values, index):
    """A hint to bring the cache line of ``values[index]`` (a 1-D array) into L2 (``llvm.prefetch``:
    read, locality 2).  No bounds check: the callers keep ``index`` in range."""
    def codegen(context, builder, sig, args):
        array = context.make_array(sig.args[0])(context, builder, args[0])
        address = builder.gep(array.data, [args[1]])
        i32 = ir.IntType(32)
        # declare_intrinsic mangles the name for the pointer type (llvm.prefetch.p0 with opaque
        # pointers, llvm.prefetch.p0f32 with the typed pointers of older LLVMs)
        prefetch = builder.module.declare_intrinsic(
            'llvm.prefetch', [address.type], ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]))
        builder.call(prefetch, [address, i32(0), i32(2), i32(1)])
        return context.get_dummy_value()
    return types.void(values, types.intp), codegen


def _inline_by_dtype(stub, float32_impl, float64_impl):
    """Give the stub ``stub(x)`` numba implementations for float32 and float64 scalars, inlined into
    their callers by numba (so that LLVM vectorizes the loops around them)."""
    @overload(stub, jit_options=_OVERLOAD_JIT, inline='always')
    def by_dtype(x):
        return {types.float32: float32_impl, types.float64: float64_impl}.get(x)
    return by_dtype


def _exp(x):
    """exp(x) for a float32 or float64 scalar, vectorizable (see the overload below)."""
    raise NotImplementedError  # pragma: no cover - only its numba overload runs


def _exp32(x):
    # exp(a) = 2**n * exp(f), n = round(a / ln 2), f = a - n ln 2 (ln 2 in two parts: f exact);
    # exp(f) on |f| <= ln(2) / 2 by its Taylor polynomial to degree 7 (truncation 0.1 ulp);
    # 2**n = 2**h * 2**(n - h), each a normal float, so that results down in the subnormals are
    # rounded once.  a is x clamped to where the result is already 0 (and n fits the two scales)
    # or inf: -inf gives 0, +inf inf.
    a = x if x > numpy.float32(-175.0) else numpy.float32(-175.0)
    a = a if a < numpy.float32(89.0) else numpy.float32(89.0)
    t = a * numpy.float32(1.4426950408889634)
    n_float = (t + numpy.float32(12582912.0)) - numpy.float32(12582912.0)  # round to nearest
    n = numpy.int32(n_float)
    f = a - n_float * numpy.float32(0.693145751953125)
    f = f - n_float * numpy.float32(1.428606765330187e-06)
    p = numpy.float32(1.0 / 5040.0)
    p = p * f + numpy.float32(1.0 / 720.0)
    p = p * f + numpy.float32(1.0 / 120.0)
    p = p * f + numpy.float32(1.0 / 24.0)
    p = p * f + numpy.float32(1.0 / 6.0)
    p = p * f + numpy.float32(0.5)
    p = p * f + numpy.float32(1.0)
    p = p * f + numpy.float32(1.0)
    h = n >> 1
    result = p * _float_from_bits(numpy.int32((h + 127) << 23)) * _float_from_bits(
        numpy.int32((n - h + 127) << 23))
    return result if x == x else x  # NaN stays NaN (the clamps would turn it into a number)


def _exp64(x):
    # as _exp32, with Taylor to degree 13 (truncation 0.01 ulp) and the float64 exponent range
    a = x if x > -1416.0 else -1416.0
    a = a if a < 710.0 else 710.0
    t = a * 1.4426950408889634
    n_float = (t + 6755399441055744.0) - 6755399441055744.0
    n = numpy.int64(n_float)
    f = a - n_float * 0.6931471803691238
    f = f - n_float * 1.9082149292705877e-10
    p = 1.0 / 6227020800.0
    for c in (1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
              1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = p * f + c
    h = n >> 1
    result = p * _float_from_bits(numpy.int64((h + 1023) << 52)) * _float_from_bits(
        numpy.int64((n - h + 1023) << 52))
    return result if x == x else x


_inline_by_dtype(_exp, _exp32, _exp64)


@intrinsic
def _bits_of_float(typingctx, value):
    """The bit pattern of ``value`` (float32 -> int32, float64 -> int64)."""
    if value == types.float32:
        return types.int32(types.float32), lambda context, builder, sig, args: builder.bitcast(
            args[0], ir.IntType(32))
    if value == types.float64:
        return types.int64(types.float64), lambda context, builder, sig, args: builder.bitcast(
            args[0], ir.IntType(64))
    return None


def _log1p(x):
    """log1p(x) for a float32 or float64 scalar x >= -1 (NaN propagates), vectorizable."""
    raise NotImplementedError  # pragma: no cover - only its numba overload runs


def _log1p32(x):
    # v = 1 + x rounded, c its rounding error: log1p(x) = log(v) - c / v (first order, exact enough:
    # c / v is below half an ulp of v).  log(v) = e ln 2 + log(m), v = 2**e m, m in [sqrt(1/2),
    # sqrt(2)); log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, by its series to s**9
    # (truncation 2e-9 relative).  ln 2 in two parts (e ln2_hi exact).
    v = numpy.float32(1.0) + x
    c = (v - numpy.float32(1.0)) - x
    bits = _bits_of_float(v)
    e = (bits >> 23) - 127
    m_bits = (bits & 0x007FFFFF) | 0x3F800000
    big = m_bits > 0x3FB504F3  # m > sqrt(2): halve it
    m_bits = m_bits - (0x00800000 if big else 0)
    e = e + (1 if big else 0)
    f = _float_from_bits(numpy.int32(m_bits)) - numpy.float32(1.0)
    s = f / (numpy.float32(2.0) + f)
    z = s * s
    q = numpy.float32(2.0 / 9.0)
    q = q * z + numpy.float32(2.0 / 7.0)
    q = q * z + numpy.float32(2.0 / 5.0)
    q = q * z + numpy.float32(2.0 / 3.0)
    log_m = s * numpy.float32(2.0) + s * z * q
    e_float = numpy.float32(e)
    result = e_float * numpy.float32(0.693145751953125) + (
        log_m + (e_float * numpy.float32(1.428606765330187e-06) - c / v))
    result = result if v < numpy.float32(numpy.inf) else v  # +inf
    result = result if v > numpy.float32(0.0) else (numpy.float32(-numpy.inf) if v == numpy.float32(0.0)
                                                    else numpy.float32(numpy.nan))
    return result if x == x else x


def _log1p64(x):
    # as _log1p32, the series to s**21 (truncation 1e-18 relative)
    v = 1.0 + x
    c = (v - 1.0) - x
    bits = _bits_of_float(v)
    e = (bits >> 52) - 1023
    m_bits = (bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000
    big = m_bits > 0x3FF6A09E667F3BCD
    m_bits = m_bits - (0x0010000000000000 if big else 0)
    e = e + (1 if big else 0)
    f = _float_from_bits(numpy.int64(m_bits)) - 1.0
    s = f / (2.0 + f)
    z = s * s
    q = 2.0 / 21.0
    for coefficient in (2.0 / 19.0, 2.0 / 17.0, 2.0 / 15.0, 2.0 / 13.0, 2.0 / 11.0, 2.0 / 9.0, 2.0 / 7.0,
                        2.0 / 5.0, 2.0 / 3.0):
        q = q * z + coefficient
    log_m = s * 2.0 + s * z * q
    e_float = numpy.float64(e)
    result = e_float * 6.93147180369123816490e-01 + (log_m + (e_float * 1.90821492927058770002e-10 - c / v))
    result = result if v < numpy.inf else v
    result = result if v > 0.0 else (-numpy.inf if v == 0.0 else numpy.nan)
    return result if x == x else x


_inline_by_dtype(_log1p, _log1p32, _log1p64)


def _expm1(x):
    """expm1(x) for a float32 or float64 scalar, vectorizable."""
    raise NotImplementedError  # pragma: no cover - only its numba overload runs


def _expm1_32(x):
    # |x| < ln 2: x + x**2 (1/2 + x/6 + ...), Taylor to x**10 (truncation 1e-8 relative); else
    # exp(x) - 1, where nothing cancels (exp(x) <= 1/2 or >= 2)
    q = numpy.float32(1.0 / 3628800.0)
    for coefficient in (1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
                        1.0 / 6.0, 0.5):
        q = q * x + numpy.float32(coefficient)
    small = x + x * x * q
    return small if abs(x) < numpy.float32(0.6931471805599453) else _exp(x) - numpy.float32(1.0)


def _expm1_64(x):
    # as _expm1_32, Taylor to x**17 (truncation 3e-18 relative)
    q = 1.0 / 355687428096000.0
    for coefficient in (1.0 / 20922789888000.0, 1.0 / 1307674368000.0, 1.0 / 87178291200.0,
                        1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                        1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
                        1.0 / 6.0, 0.5):
        q = q * x + coefficient
    small = x + x * x * q
    return small if abs(x) < 0.6931471805599453 else _exp(x) - 1.0


_inline_by_dtype(_expm1, _expm1_32, _expm1_64)


@numba.njit(**_JIT)
def _row_max(row):
    """Step 1: the max of a row, NaN skipped (NaN reaches the results through its exponential).
    Eight running maxima (a max is exact in any order): LLVM keeps them in registers."""
    _prefer_wide_vectors()
    K = row.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row.dtype.type(-numpy.inf)
    for k in range(0, K - K % 8, 8):
        v = row[k]
        m0 = v if v > m0 else m0
        v = row[k + 1]
        m1 = v if v > m1 else m1
        v = row[k + 2]
        m2 = v if v > m2 else m2
        v = row[k + 3]
        m3 = v if v > m3 else m3
        v = row[k + 4]
        m4 = v if v > m4 else m4
        v = row[k + 5]
        m5 = v if v > m5 else m5
        v = row[k + 6]
        m6 = v if v > m6 else m6
        v = row[k + 7]
        m7 = v if v > m7 else m7
    for k in range(K - K % 8, K):
        v = row[k]
        m0 = v if v > m0 else m0
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    m4 = m5 if m5 > m4 else m4
    m6 = m7 if m7 > m6 else m6
    m0 = m2 if m2 > m0 else m0
    m4 = m6 if m6 > m4 else m4
    return m4 if m4 > m0 else m0


@numba.njit(**_SUM_JIT)
def _sum_wide(row):
    """The sum of a row in float64 (label smoothing's mean logit: no cancellation at large offsets)."""
    _prefer_wide_vectors()
    total = 0.0
    for k in range(row.shape[0]):
        total += numpy.float64(row[k])
    return total


@numba.njit(**_SUM_JIT)
def _exp_sum(row, shift, exp_out):
    """``exp_out = exp(row - shift)`` and its sum."""
    _prefer_wide_vectors()
    total = row.dtype.type(0)
    for k in range(row.shape[0]):
        e = _exp(row[k] - shift)
        exp_out[k] = e
        total += e
    return total


@numba.njit(**_SUM_JIT)
def _sum(values):
    _prefer_wide_vectors()
    total = values.dtype.type(0)
    for k in range(values.shape[0]):
        total += values[k]
    return total


@numba.njit(**_JIT)
def _exp_sum_others(row, shift, label, exp_out):
    """Step 2: ``exp_out = exp(row - shift)`` and its sum over the classes other than ``label``.

    One loop gives every term and their total.  Where the label's term is at most half of it, the
    others' sum is the total minus that term: it loses at most a bit, as the others are at least
    the label's term.  A confident row's loss is the others' small sum, which a subtraction from
    a total near 1 would leave with few digits: there the label's term is left out, not subtracted
    (see ``_numpy_backend._label_sums``), summing the other terms again from ``exp_out``, before
    and after the label (additions only).  A NaN total takes that branch too (NaN compares false):
    a NaN among the other terms keeps the sum NaN, and one in the label's term reaches the results
    through that term and the label's logit."""
    _prefer_wide_vectors()
    total = _exp_sum(row, shift, exp_out)
    label_exp = exp_out[label]
    if label_exp + label_exp <= total:
        return total - label_exp
    return _sum(exp_out[:label]) + _sum(exp_out[label + 1:])


@numba.njit(**_JIT)
def _scaled_minus(values, scale, minus, out):
    """``out = values * scale - minus`` over a row: the gradient from the exponentials or a stored
    softmax, ``(softmax_k * prob_scale - t_k) * gw`` with the label's term put afterwards."""
    _prefer_wide_vectors()
    for k in range(values.shape[0]):
        out[k] = values[k] * scale - minus


@numba.njit(**_JIT)
def _scaled_minus_in_place(values, scale, minus):
    """``_scaled_minus`` of a row onto itself (one array: LLVM vectorizes it without alias checks)."""
    _prefer_wide_vectors()
    for k in range(values.shape[0]):
        values[k] = values[k] * scale - minus


@numba.njit(**_JIT)
def _exp_scaled_minus(values, lse, scale, minus, out):
    """``out = exp(values - lse) * scale - minus``: the gradient from lse."""
    _prefer_wide_vectors()
    for k in range(values.shape[0]):
        out[k] = _exp(values[k] - lse) * scale - minus


@numba.njit(**_JIT)
def _copy(values, out):
    _prefer_wide_vectors()
    for k in range(values.shape[0]):
        out[k] = values[k]


@numba.njit(**_JIT)
def _divided(values, divisor, out):
    """``out = values / divisor``: the softmax, divided rather than scaled by ``1 / divisor``, so that a
    row whose other terms underflow gives exactly 1."""
    _prefer_wide_vectors()
    for k in range(values.shape[0]):
        out[k] = values[k] / divisor


@numba.njit(**_JIT)
def _divided_in_place(values, divisor):
    """``_divided`` of a row onto itself."""
    _prefer_wide_vectors()
    for k in range(values.shape[0]):
        values[k] = values[k] / divisor


# --------------------------------------------------------------------------
# a row's scalars (the same for both loop nests)
# --------------------------------------------------------------------------

@numba.njit(inline='always', **_JIT)
def _decode(raw, ignore_index, K):
    """Step 3: ``(ignored, bad, index)`` of a hard label; an invalid row reads class 0 (unused)."""
    raw = numpy.int64(raw)
    ignored = raw == ignore_index
    bad = not ignored and not (0 <= raw < K)
    return ignored, bad, 0 if ignored or bad else raw


@numba.njit(inline='always', **_JIT)
def _row_weight(weight, index, eps, weight_mean):
    """Paddle's row weight ``sum_k t_k w_k``: ``(1 - eps) w[label] + eps mean(w)`` (1 without weights)."""
    if weight.shape[0] == 0:
        return type(weight_mean)(1)  # weight_mean: a scalar of the compute dtype
    if eps != 0:
        return (type(eps)(1) - eps) * weight[index] + eps * weight_mean
    return weight[index]


@numba.njit(inline='always', **_JIT)
def _headroom(like):
    """_numpy_backend's EXP_HEADROOM in the float type of ``like``: exp(headroom + 1) stays finite."""
    A = type(like)
    return A(80.0) if numpy.finfo(A).max < 1e39 else A(700.0)


@numba.njit(inline='always', **_JIT)
def _forward_terms(shift, shifted, others, label_exp, x_label, mean_gap, gw, w_row, eps, z_loss, K, gradient):
    """Steps 2, 4 and 5's scalars of a row from its sums: ``(lse, loss, scale, minus, label_term)``,
    the gradient being ``exp(x_k - shift) * scale - minus`` and ``label_term`` at the label (computed
    only with ``gradient``).  ``others`` is the sum of ``exp(x_k - shift)`` without the label's term
    (``label_exp``), ``mean_gap`` = shift - mean_k x_k (float64; smoothing only).

    ``shifted`` (shift = the row max): one logarithm a row, ``lse = shift + log(total)`` and the
    loss ``lse - x[label] = log(total) + (shift - x[label])``, two terms >= 0 (no cancellation) --
    except where the label's logit is the max: then its term is 1 and the loss ``log1p(others)``,
    exact for a confident prediction (a loss of 1e-8 as well as one of 10).  Unshifted (shift 0,
    the caller checked that the sum is safe): the loss is ``log1p(others * exp(-x[label]))`` as in
    ``_numpy_backend._row_sums``, or ``log(total) - x[label]`` where the label's logit is so far
    below the lse that the factor would overflow (then nothing cancels)."""
    A = type(others)
    total = others + label_exp
    # log(total) as log1p(total - 1): total - 1 is exact up to 2 and rounded by half an ulp above
    # (shifted, total >= 1: the max's term is 1); branch-free, so that a loop over rows vectorizes.
    # The label is the max where its term is 1 (not NaN: a row holding +inf has lse NaN)
    log_total = _log1p(others if shifted and label_exp == A(1) else total - A(1))
    if shifted:
        ce = log_total + (shift - x_label)  # = log1p(others) when the label is the max
    else:
        far = x_label < log_total - _headroom(log_total) or x_label == -numpy.inf
        near = _log1p(others * _exp(-x_label))
        ce = log_total - x_label if far else near
    lse = shift + log_total
    loss = ce
    if eps != 0:  # (1 - eps) ce + eps (lse - mean_k x_k)
        loss = (A(1) - eps) * ce + eps * (log_total + A(mean_gap))
    if z_loss != 0:
        loss = loss + z_loss * lse * lse
    loss = loss * w_row
    # d loss / d x_k = (softmax_k * scale - t_k) * gw, scale = sum_k t_k + 2 z lse = 1 + 2 z lse,
    # t_k = (1 - eps) [k == label] + eps / K; softmax_k = exp(x_k - shift) / total
    two_z_lse, minus = _feature_terms(lse, gw, eps, z_loss, K)
    scale = A(1) + two_z_lse
    # the label's own term from expm1 of its log-probability (exact for a confident row):
    # (softmax - 1) scale + (scale - 1) + (1 - t_label), scale - 1 = 2 z lse
    label_term = A(0)
    if gradient:
        label_term = (_expm1(-ce) * scale + two_z_lse + (eps - eps / A(K))) * gw
    return lse, loss, scale * gw / total, minus, label_term


@numba.njit(inline='always', **_JIT)
def _feature_terms(lse, gw, eps, z_loss, K):
    """``(2 z lse, eps / K * gw)``, each 0 (selected, not multiplied) when its feature is off: an
    infinite lse or loss_grad then gives the featureless gradient, not 0 * inf = NaN."""
    zero = type(lse)(0)
    two_z_lse = (z_loss + z_loss) * lse if z_loss != zero else zero
    minus = eps / type(lse)(K) * gw if eps != zero else zero
    return two_z_lse, minus


@numba.njit(inline='always', **_JIT)
def _lse_terms(lse, x_label, gw, eps, z_loss, K):
    """The backward from lse: ``(scale, minus, label_term)``, the gradient being ``exp(x_k - lse) *
    scale - minus`` and ``label_term`` at the label (as in ``_forward_terms``)."""
    A = type(lse)
    two_z_lse, minus = _feature_terms(lse, gw, eps, z_loss, K)
    scale = A(1) + two_z_lse
    label_term = (_expm1(x_label - lse) * scale + two_z_lse + (eps - eps / A(K))) * gw
    return scale * gw, minus, label_term


# --------------------------------------------------------------------------
# the two loop nests
# --------------------------------------------------------------------------

@numba.njit(**_JIT)
def rows(op, x, label, lse_in, loss_grad, ignore_index, weight, weight_mean, eps, z_loss, loss, lse, out, work):
    """One operation on a tile of rows of more than COLUMNS_MAX_K classes, a row at a time while it
    is in cache; returns the first row with a bad label (or -1).

    op            FORWARD (loss, lse), FORWARD_SOFTMAX (loss, softmax into ``out``), FORWARD_BACKWARD
                  (loss, gradient into ``out``), BACKWARD_LSE (gradient from ``x`` and ``lse_in``),
                  BACKWARD_SOFTMAX (Paddle's grad op: ``x`` holds the softmax; no features)
    x             (n, K) C-contiguous logits (or the softmax) in the compute dtype, a row each
    label         (n,) int64 hard labels; ``ignore_index`` marks ignored rows (loss and
                  gradient 0), a label outside [0, K) is bad (its row's loss and gradient NaN)
    lse_in        (n,) the rows' lse for BACKWARD_LSE, else empty
    loss_grad     (n,) the loss gradient of each row, or empty for ones
    weight        (K,) class weights or empty; ``weight_mean`` their mean (a compute-dtype scalar)
    eps, z_loss   label smoothing and z-loss, compute-dtype scalars (0 when off)
    loss, lse     (n,) outputs in the compute dtype, or empty when not wanted
    out           (n, K) C-contiguous output in the compute dtype (the softmax or the gradient), or
                  empty; it may be ``x`` itself (in place)
    work          (K,) scratch in the compute dtype that overlaps nothing else (a row's exponentials)
    """
    _prefer_wide_vectors()
    n, K = x.shape
    in_place = out.shape[0] > 0 and out.ctypes.data == x.ctypes.data
    zero, half = type(eps)(0), type(eps)(0.5)
    lowest, largest = numpy.finfo(x.dtype).min, numpy.finfo(x.dtype).max
    bad_row = -1
    # short rows: the lines PREFETCH_AHEAD_BYTES ahead of each row, one row's worth a row
    flat = x.reshape(n * K)
    prefetch = K * x.itemsize <= PREFETCH_MAX_ROW_BYTES
    ahead, line = PREFETCH_AHEAD_BYTES // x.itemsize, CACHE_LINE_BYTES // x.itemsize
    for r in range(n):
        row = x[r]
        if prefetch:
            for e in range(r * K + ahead, min((r + 1) * K + ahead, n * K), line):
                _prefetch_to_l2(flat, e)
        ignored, bad, idx = _decode(label[r], ignore_index, K)
        if bad and bad_row < 0:
            bad_row = r
        if op >= FORWARD_BACKWARD and (ignored or bad):
            # an ignored row's loss and gradient are 0, a bad one's NaN (selected: its logits may be NaN)
            fill = zero if ignored else type(eps)(numpy.nan)
            out[r, :] = fill
            if op == FORWARD_BACKWARD:
                loss[r] = fill
            continue
        w_row = _row_weight(weight, idx, eps, weight_mean)
        gw = (loss_grad[r] if loss_grad.shape[0] > 0 else type(eps)(1)) * w_row
        x_label = row[idx]  # read before an in-place gradient overwrites the row
        if op == BACKWARD_SOFTMAX or op == BACKWARD_LSE:
            lse_value = lse_in[r] if op == BACKWARD_LSE else zero
            if op == BACKWARD_SOFTMAX:  # (softmax - onehot) * loss_grad, softmax[label] - 1 as stored
                scale, minus, label_term = gw, zero, (x_label - type(eps)(1)) * gw
            else:
                scale, minus, label_term = _lse_terms(lse_value, x_label, gw, eps, z_loss, K)
            out_row = out[r]
            if in_place:  # through work: a loop over two arrays that are one is not vectorized
                if op == BACKWARD_LSE:
                    _exp_scaled_minus(row, lse_value, scale, minus, work)
                else:
                    _scaled_minus(row, scale, minus, work)
                _copy(work, out_row)
            elif op == BACKWARD_LSE:
                _exp_scaled_minus(row, lse_value, scale, minus, out_row)
            else:
                _scaled_minus(row, scale, minus, out_row)
            out_row[idx] = label_term
            continue
        # step 2 on exp(x) unshifted first: the row max would cost a pass of its own.  A row keeps
        # it when the sum lies in [0.5, max] (nothing overflowed, no NaN; an underflowed term is
        # off by at most 2 subnormal ulps, as shifted); the others are shifted by their max (step 1:
        # a row of -inf by the lowest finite value, so that x - shift is -inf, not NaN: its sum is 0
        # and its lse -inf, as in _numpy_backend).  The choice is the row's own.
        # out of place, the exponentials go straight into the output row: its first touch (a
        # fresh page's fault, the read for ownership) then overlaps the exponentials instead of
        # being a pass of its own, and step 5 rescales the row in cache
        exps = out[r] if op >= FORWARD_SOFTMAX and not in_place else work
        shift = zero
        others = _exp_sum_others(row, shift, idx, exps)
        total = others + exps[idx]
        shifted = not (total >= half and total <= largest)
        if shifted:
            row_max = _row_max(row)
            shift = row_max if row_max > lowest else lowest
            others = _exp_sum_others(row, shift, idx, exps)
        mean_gap = numpy.float64(shift) - _sum_wide(row) / K if eps != 0 else 0.0
        row_lse, row_loss, scale, minus, label_term = _forward_terms(
            shift, shifted, others, exps[idx], x_label, mean_gap, gw, w_row, eps, z_loss, K, op == FORWARD_BACKWARD)
        if lse.shape[0] > 0:
            lse[r] = row_lse
        loss[r] = zero if ignored else (type(eps)(numpy.nan) if bad else row_loss)
        if op == FORWARD_SOFTMAX:
            if in_place:
                _divided(exps, others + exps[idx], out[r])
            else:
                _divided_in_place(exps, others + exps[idx])
        elif op == FORWARD_BACKWARD:  # step 5
            if in_place:
                _scaled_minus(exps, scale, minus, out[r])
            else:
                _scaled_minus_in_place(exps, scale, minus)
            out[r, idx] = label_term
    return bad_row


@numba.njit(**_JIT)
def _columns_block(op, xt, nb, label, lse_in, loss_grad, ignore_index, weight, weight_mean, eps, z_loss, loss, lse,
                   work, scratch, wide, index, state):
    """The steps for a block of ``nb`` rows of at most COLUMNS_MAX_K classes, vectorized across the
    rows: ``xt`` is ``(K, block)`` C-contiguous, row j being ``xt[:, j]``, and each step runs class
    after class over the block, so a row's sums run in class order whatever the block.  Returns
    the first bad row of the block (or -1).

    label, lse_in, loss_grad, loss, lse   the block's per-row arrays (length nb; lse_in, loss_grad
                  and lse may be empty: absent), as in ``rows``
    work          (K, block): the exponentials; on return the output (softmax or gradient, invalid
                  rows and the label's terms included) for every op but FORWARD
    scratch       (SCRATCH_ROWS, block), wide (block,) float64, index (block,) int32 (the label's
                  class: compared with the class index along the float lanes), state (block,) int8:
                  per-row scratch
    """
    _prefer_wide_vectors()
    K = xt.shape[0]
    A = type(eps)
    zero, one, nan = A(0), A(1), A(numpy.nan)
    lowest = numpy.finfo(xt.dtype).min
    x_label, label_exp, w_row, gw = scratch[0], scratch[1], scratch[2], scratch[3]
    shift, others, row_lse, row_loss = scratch[4], scratch[5], scratch[6], scratch[7]
    scale, minus, label_term = scratch[8], scratch[9], scratch[10]
    bad_row = -1
    # step 3, row by row (gathers and the first bad row)
    for j in range(nb):
        ignored, bad, idx = _decode(label[j], ignore_index, K)
        if bad and bad_row < 0:
            bad_row = j
        index[j] = idx
        state[j] = IGNORED if ignored else (BAD if bad else VALID)
        x_label[j] = xt[idx, j]
        w_row[j] = _row_weight(weight, idx, eps, weight_mean)
        gw[j] = (loss_grad[j] if loss_grad.shape[0] > 0 else one) * w_row[j]
    if op <= FORWARD_BACKWARD:
        # step 1 (a NaN is skipped, or in class 0 makes the shift the lowest value: either way it
        # reaches the results through its exponential), then step 2 class after class into work,
        # the label's term left out of the sum
        for j in range(nb):
            shift[j] = xt[0, j]
        for k in range(1, K):
            row_k = xt[k]
            for j in range(nb):
                shift[j] = row_k[j] if row_k[j] > shift[j] else shift[j]
        for j in range(nb):
            shift[j] = shift[j] if shift[j] > lowest else lowest
        if eps != 0:
            for j in range(nb):
                wide[j] = 0.0
            for k in range(K):
                row_k = xt[k]
                for j in range(nb):
                    wide[j] += numpy.float64(row_k[j])
        for j in range(nb):
            others[j] = zero
        for k in range(K):
            row_k = xt[k]
            work_k = work[k]
            for j in range(nb):
                e = _exp(row_k[j] - shift[j])
                work_k[j] = e
                others[j] += e if index[j] != k else zero
        for j in range(nb):
            label_exp[j] = work[index[j], j]
        # steps 4 and 5's scalars, vectorized across the rows (the lse even when not wanted: a branch
        # would keep the loop scalar); the label's gradient term (an expm1) only for an op that
        # writes a gradient, a loop of its own for each
        if op == FORWARD:
            _block_terms(nb, K, shift, others, label_exp, x_label, wide, gw, w_row, state, eps, z_loss, False,
                         row_lse, row_loss, scale, minus, label_term)
        else:
            _block_terms(nb, K, shift, others, label_exp, x_label, wide, gw, w_row, state, eps, z_loss, True,
                         row_lse, row_loss, scale, minus, label_term)
        loss[:] = row_loss[:nb]
        if lse.shape[0] > 0:
            lse[:] = row_lse[:nb]
        if op == FORWARD:
            return bad_row
        if op == FORWARD_SOFTMAX:  # divided (see _divided)
            for k in range(K):
                work_k = work[k]
                for j in range(nb):
                    work_k[j] = work_k[j] / (others[j] + label_exp[j])
            return bad_row
    elif op == BACKWARD_LSE:
        for k in range(K):
            row_k = xt[k]
            work_k = work[k]
            for j in range(nb):
                work_k[j] = _exp(row_k[j] - lse_in[j])
        for j in range(nb):
            scale[j], minus[j], label_term[j] = _lse_terms(lse_in[j], x_label[j], gw[j], eps, z_loss, K)
    else:  # BACKWARD_SOFTMAX: (softmax - onehot) * loss_grad, softmax[label] - 1 as stored
        for k in range(K):
            row_k = xt[k]
            work_k = work[k]
            for j in range(nb):
                work_k[j] = row_k[j]
        for j in range(nb):
            scale[j], minus[j], label_term[j] = gw[j], zero, (x_label[j] - one) * gw[j]
    # step 5: the gradient in work; an invalid row's is its fill, selected (its logits may be NaN)
    for k in range(K):
        work_k = work[k]
        for j in range(nb):
            value = work_k[j] * scale[j] - minus[j]
            work_k[j] = value if state[j] == VALID else (zero if state[j] == IGNORED else nan)
    for j in range(nb):
        if state[j] == VALID:
            work[index[j], j] = label_term[j]
    return bad_row


@numba.njit(inline='always', **_JIT)
def _block_terms(nb, K, shift, others, label_exp, x_label, wide, gw, w_row, state, eps, z_loss, gradient,
                 row_lse, row_loss, scale, minus, label_term):
    """``_forward_terms`` for the rows of a block (each argument a per-row scratch row; ``wide`` the
    float64 sums of the logits under smoothing), into row_lse, row_loss (0 ignored, NaN bad),
    scale, minus and label_term; ``gradient`` a constant at each call site, so that the loop has no
    branch."""
    A = type(eps)
    for j in range(nb):
        mean_gap = numpy.float64(shift[j]) - wide[j] / K if eps != 0 else 0.0
        row_lse[j], value, scale[j], minus[j], label_term[j] = _forward_terms(
            shift[j], True, others[j], label_exp[j], x_label[j], mean_gap, gw[j], w_row[j], eps, z_loss, K,
            gradient)
        row_loss[j] = value if state[j] == VALID else (A(0) if state[j] == IGNORED else A(numpy.nan))


# Rows of ``_columns_block``'s float scratch.
SCRATCH_ROWS = 11


@numba.njit(**_JIT)
def columns(op, x, label, lse_in, loss_grad, ignore_index, weight, weight_mean, eps, z_loss, loss, lse, out, work):
    """``rows`` for rows of at most COLUMNS_MAX_K classes along a strided axis: a tile is
    ``(slabs, K, m)``, row ``(s, j)`` being ``x[s, :, j]`` (the NumPy backend's strided tiles),
    taken in blocks of ``work.shape[1]`` rows (``column_block``: in L2 between the steps).  The
    per-row arrays are ``(slabs, m)``, ``out`` is ``(slabs, K, m)`` (may be ``x``) and ``work``
    ``(K, block)`` scratch; a bad row is reported as ``s * m + j``.  Arguments otherwise as in
    ``rows``."""
    _prefer_wide_vectors()
    slabs, K, m = x.shape
    block = work.shape[1]
    xt = numpy.empty((K, block), x.dtype)
    scratch = numpy.empty((SCRATCH_ROWS, block), x.dtype)
    wide = numpy.empty(block, numpy.float64)
    index = numpy.empty(block, numpy.int32)
    state = numpy.empty(block, numpy.int8)
    bad_row = -1
    for s in range(slabs):
        xs = x[s]
        for j0 in range(0, m, block):
            nb = min(block, m - j0)
            for k in range(K):  # the block's logits, contiguous (loops from 0 over views: numba
                row_k = xs[k, j0:j0 + nb]  # then knows no index is negative)
                xt_k = xt[k]
                for j in range(nb):
                    xt_k[j] = row_k[j]
            bad = _columns_block(
                op, xt, nb, label[s, j0:j0 + nb], _block_of(lse_in, s, j0, nb), _block_of(loss_grad, s, j0, nb),
                ignore_index, weight, weight_mean, eps, z_loss, _block_of(loss, s, j0, nb), _block_of(lse, s, j0, nb),
                work, scratch, wide, index, state)
            if bad >= 0 and bad_row < 0:
                bad_row = s * m + j0 + bad
            if op != FORWARD:  # x's block is in xt: out may be x
                for k in range(K):
                    out_k = out[s, k, j0:j0 + nb]
                    work_k = work[k]
                    for j in range(nb):
                        out_k[j] = work_k[j]
    return bad_row


@numba.njit(inline='always', **_JIT)
def _block_of(per_row, s, j0, nb):
    """A block of a slab's per-row array, or the empty array itself (flattened) when it is absent."""
    return per_row[s, j0:j0 + nb] if per_row.shape[0] > 0 else per_row.reshape(per_row.size)


@numba.njit(**_JIT)
def columns_of_rows(op, x, label, lse_in, loss_grad, ignore_index, weight, weight_mean, eps, z_loss, loss, lse,
                    out, work):
    """``columns`` for contiguous rows: ``x`` is ``(n, K)``, each block of rows transposed into
    scratch on the way in (and the output on the way out) while it is in cache; the per-row
    arrays are ``(n,)`` and ``out`` ``(n, K)`` (may be ``x``).  The same steps in the same order
    as ``columns``, so a row's bits do not depend on the layout it comes in."""
    _prefer_wide_vectors()
    n, K = x.shape
    block = work.shape[1]
    xt = numpy.empty((K, block), x.dtype)
    scratch = numpy.empty((SCRATCH_ROWS, block), x.dtype)
    wide = numpy.empty(block, numpy.float64)
    index = numpy.empty(block, numpy.int32)
    state = numpy.empty(block, numpy.int8)
    bad_row = -1
    for j0 in range(0, n, block):
        nb = min(block, n - j0)
        rows_b = x[j0:j0 + nb]
        for k in range(K):  # class by class: a strided gather a class (LLVM vectorizes it), where
            xt_k = xt[k]      # row by row stored K scattered elements a row (40% of a forward at K = 10)
            for j in range(nb):
                xt_k[j] = rows_b[j, k]
        bad = _columns_block(
            op, xt, nb, label[j0:j0 + nb], lse_in[j0:j0 + nb] if lse_in.shape[0] > 0 else lse_in[:0],
            loss_grad[j0:j0 + nb] if loss_grad.shape[0] > 0 else loss_grad[:0], ignore_index, weight, weight_mean,
            eps, z_loss, loss[j0:j0 + nb] if loss.shape[0] > 0 else loss[:0],
            lse[j0:j0 + nb] if lse.shape[0] > 0 else lse[:0], work, scratch, wide, index, state)
        if bad >= 0 and bad_row < 0:
            bad_row = j0 + bad
        if op != FORWARD:
            out_b = out[j0:j0 + nb]
            for j in range(nb):
                out_row = out_b[j]
                for k in range(K):
                    out_row[k] = work[k, j]
    return bad_row


def column_block(K, rows):
    """Rows a ``columns`` block takes (``work``'s second dimension) for a tile of ``rows`` rows:
    about COLUMNS_BLOCK elements, a multiple of LANE_ROWS, and no more than the tile needs (a
    small tile gets small scratch: the kernels size theirs by it)."""
    block = max(LANE_ROWS, COLUMNS_BLOCK // max(K, 1) // LANE_ROWS * LANE_ROWS)
    return min(block, max(LANE_ROWS, -(-rows // LANE_ROWS) * LANE_ROWS))


_quiet_lock = threading.Lock()


def _compiled_quietly(dispatcher):
    """Compile ``dispatcher``'s new signatures without NumbaIRAssumptionWarning: numba's IR inliner
    (``inline='always'``, which lets LLVM vectorize the loops over rows) trips that internal
    pedantic check ("variable ... is not in scope"), which says nothing about the code."""
    compile_for_args = dispatcher._compile_for_args

    def compile_quietly(*args, **kwargs):
        with _quiet_lock, warnings.catch_warnings():  # catch_warnings is process-wide: one at a time
            warnings.simplefilter('ignore', NumbaIRAssumptionWarning)
            return compile_for_args(*args, **kwargs)
    dispatcher._compile_for_args = compile_quietly
    return dispatcher


rows = _compiled_quietly(rows)
columns = _compiled_quietly(columns)
columns_of_rows = _compiled_quietly(columns_of_rows)
