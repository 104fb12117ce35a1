"""The README's contract as properties, on every backend (numpy; the CuPy backend through the host
harness; on a GPU when one is present).

For random shapes (rank 1-4, odd sizes, K up to a few thousand), axes, memory layouts, thread
counts, batch splits, label kinds and loss-family features, every public function must give:

* batch invariance -- a row's outputs are bit for bit the same alone, in any batch, at any
  position, in any memory layout of the inputs and (NumPy) on any thread count and tiling; the
  'mean' and 'sum' reductions the same in any layout and on any thread count;
* in place equal to out of place, bit for bit, and ``forward``'s loss equal to
  ``forward_backward``'s;
* accuracy against an exact (long double) loss within the README's ulp bounds (``ULP_BOUNDS``), also
  where the label dominates (losses from 1e-8 to 1e2);
* inputs never modified; an ``out`` overlapping an input handled or rejected; with a bad label
  nothing written.

The one documented exception: the CUDA kernels sum contiguous rows (class axis last) and strided
rows (class axis not last) in different orders, so on that backend a slice that turns strided
rows into contiguous ones (``x[:, j:j + 1]`` with ``axis=0``) agrees only to rounding.

Hypothesis profiles (tests/conftest.py): ``ci`` (default, a few examples a test) and ``long``
(``HYPOTHESIS_PROFILE=long python -m pytest tests/test_contract.py``).
"""
import math

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cupy_sce
from cupy_sce import testing
from helpers import BFLOAT16, DTYPES, HALF_DTYPES, finfo, make_weight, soft_label_dtype
from reference import reference_family

THREAD_COUNTS = (1, 2, 3, 7)
# NumPy tile sizes (elements): one row or column a tile up to one tile for everything
TILE_ELEMENTS = (1, 7, 64, 500, 1 << 16)


# ----------------------------------------------------------------------------- problems

@st.composite
def shapes(draw, max_elements):
    """(shape, axis) with rank 1-4 and K from 1 to a few thousand; the other sizes odd or even,
    1 included, the total at most ``max_elements``."""
    ndim = draw(st.integers(1, 4))
    axis = draw(st.integers(-ndim, ndim - 1))
    K = draw(st.one_of(st.integers(1, 70), st.integers(1, 3000)))
    K = min(K, max_elements)
    others = []
    room = max_elements // K
    for _ in range(ndim - 1):
        n = draw(st.integers(1, max(1, min(9, room))))
        room = max(1, room // n)
        others.append(n)
    shape = others[:]
    shape.insert(axis % ndim, K)
    return tuple(shape), axis


@st.composite
def family_options(draw):
    """Loss-family keywords (possibly none)."""
    kw = {}
    if draw(st.booleans()):
        kw['weight'] = True
    if draw(st.booleans()):
        kw['label_smoothing'] = draw(st.sampled_from([0.1, 0.5]))
    if draw(st.booleans()):
        kw['z_loss'] = draw(st.sampled_from([1e-4, 0.05]))
    if draw(st.booleans()):
        kw['softcap'] = draw(st.sampled_from([1.5, 15.0]))
    return kw


class Case:
    """Logits, labels, loss_grad and family keywords of one problem (numpy arrays)."""

    def __init__(self, rng, shape, axis, dtype, soft, kw, dominated=False, ignore_index=-100):
        self.shape, self.axis, self.dtype, self.soft = shape, axis % len(shape), numpy.dtype(dtype), soft
        K = shape[self.axis]
        x = rng.standard_normal(shape) * 3
        row_shape = shape[:self.axis] + (1,) + shape[self.axis + 1:]
        if soft:
            label = rng.random(shape) * (rng.random(shape) < 0.7)
            self.label = (label / numpy.maximum(label.sum(self.axis, keepdims=True), 1e-3)).astype(
                soft_label_dtype(dtype))
        else:
            label = rng.integers(0, K, row_shape)
            if dominated:
                x = _dominate(rng, x, label, self.axis)
            label[rng.random(row_shape) < 0.15] = ignore_index
            self.label = label
        self.x = x.astype(dtype)
        self.probs = (rng.random(shape) + 0.01).astype(dtype)  # inputs of use_softmax=False
        self.loss_grad = rng.uniform(-2, 2, row_shape).astype(dtype)
        self.ignore_index = ignore_index
        self.kw = dict(kw)
        if self.kw.pop('weight', False):
            self.kw['weight'] = make_weight(rng, K, numpy.float32)

    def sliced(self, index):
        """The same problem on a sub-batch: ``index`` slices every axis but the class axis."""
        c = object.__new__(Case)
        c.__dict__.update(self.__dict__)
        c.x = self.x[index]
        c.probs = self.probs[index]
        c.label = self.label[index]
        c.loss_grad = self.loss_grad[index]
        c.shape = c.x.shape
        return c

    def keywords(self, backend=None):
        """The call's keywords; with ``backend``, its arrays (the class weights) on that backend, for
        direct calls (``backend(fn, ...)`` moves them itself)."""
        kw = dict(self.kw, soft_label=self.soft, ignore_index=self.ignore_index, axis=self.axis)
        return kw if backend is None else {k: backend.asarray(v) for k, v in kw.items()}


def _dominate(rng, x, label, axis):
    """Raise each row's label logit so that its loss is about 10**u, u uniform in [-8, 2]."""
    xl = numpy.moveaxis(x, axis, -1).copy()
    lab = numpy.moveaxis(label, axis, -1)
    target = 10 ** rng.uniform(-8, 2, lab.shape)
    others = xl.copy()
    numpy.put_along_axis(others, lab, -numpy.inf, axis=-1)
    with numpy.errstate(divide='ignore'):
        lse_others = numpy.logaddexp.reduce(others, axis=-1, keepdims=True)
        value = numpy.where(numpy.isfinite(lse_others), lse_others - numpy.log(numpy.expm1(target)), 0.0)
    numpy.put_along_axis(xl, lab, value, axis=-1)
    return numpy.moveaxis(xl, -1, axis)


def run_all(backend, case, layout=None, reductions=False):
    """Every public function's per-row or per-element outputs for ``case`` (numpy arrays), the
    inputs laid out by ``layout`` (a function of an array returning the same values); with
    ``reductions`` also the 'mean' and 'sum' losses and the fused gradient of a mean."""
    lay = layout or (lambda a: a)
    kw = case.keywords()
    plain = dict(soft_label=case.soft, ignore_index=case.ignore_index, axis=case.axis)
    x, label, g = lay(case.x), lay(case.label), lay(case.loss_grad)
    out = {}
    out['loss'], out['lse'] = backend(cupy_sce.forward, x, label, **kw)
    out['fused_loss'], out['fused_grad'] = backend(cupy_sce.forward_backward, x, label, g, **kw)
    out['lse_grad'] = backend(cupy_sce.backward, g, x, lay(out['lse']), label, **kw)
    out['cross_entropy'] = backend(cupy_sce.cross_entropy, x, label, reduction='none', **kw)
    if not case.kw:
        out['paddle_loss'], out['softmax'] = backend(cupy_sce.softmax_with_cross_entropy, x, label,
                                                     return_softmax=True, **plain)
        out['paddle_grad'] = backend(cupy_sce.softmax_with_cross_entropy_grad, g, lay(out['softmax']), label,
                                     **plain)
    if 'z_loss' not in case.kw and 'softcap' not in case.kw and backend.name != 'cupy':
        # probabilities as input (CuPy's own reductions sum them on a GPU: not promised bitwise)
        probs = lay(case.probs)
        out['prob_loss'] = backend(cupy_sce.forward, probs, label, use_softmax=False, **kw)[0]
        out['prob_fused_loss'], out['prob_fused_grad'] = backend(cupy_sce.forward_backward, probs, label, g,
                                                                 use_softmax=False, **kw)
        out['prob_grad'] = backend(cupy_sce.backward, g, probs, None, label, use_softmax=False, **kw)
    if reductions:
        for reduction in ('mean', 'sum'):
            out[reduction] = backend(cupy_sce.cross_entropy, x, label, reduction=reduction, **kw)
        out['mean_fused_loss'], out['mean_fused_grad'] = backend(cupy_sce.forward_backward, x, label,
                                                                 reduction='mean', **kw)
    out['row_max'] = backend(cupy_sce.row_max, x, axis=case.axis)
    out['logsumexp'] = backend(cupy_sce.logsumexp, x, axis=case.axis)
    if not case.soft:
        out['picked'] = backend(cupy_sce.gather_label_logit, x, label, ignore_index=case.ignore_index,
                                axis=case.axis)
    return out


def assert_same_bits(got, want, context):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, (context, name)
        numpy.testing.assert_array_equal(got[name], want[name], err_msg='{} {}'.format(context, name))


def _strided_rows(shape, axis):
    return math.prod(shape[axis + 1:]) > 1


# ----------------------------------------------------------------------------- invariance

@given(data=st.data())
def test_rows_are_batch_invariant(backend, data):
    """A sub-batch (any axis but the class axis, any start, length 1 included) gives the bits of the
    same rows inside the full batch."""
    shape, axis = data.draw(shapes(max_elements=6000 if backend.kind == 'numpy' else 2500))
    case = Case(numpy.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1))), shape, axis,
                data.draw(st.sampled_from(DTYPES)), data.draw(st.booleans()), data.draw(family_options()),
                dominated=data.draw(st.booleans()))
    full = run_all(backend, case)
    batch_axes = [d for d in range(len(shape)) if d != case.axis]
    if not batch_axes:
        return
    index = [slice(None)] * len(shape)
    d = data.draw(st.sampled_from(batch_axes))
    start = data.draw(st.integers(0, shape[d] - 1))
    stop = data.draw(st.integers(start + 1, shape[d]))
    index[d] = slice(start, stop)
    index = tuple(index)
    part = case.sliced(index)
    with testing.numpy_tile_elements(data.draw(st.sampled_from(TILE_ELEMENTS))):
        got = run_all(backend, part)
    want = {name: value[index] for name, value in full.items()}
    if backend.kind != 'numpy' and _strided_rows(shape, case.axis) != _strided_rows(part.shape, case.axis):
        # the documented exception: the kernels sum strided and contiguous rows in different orders
        for name in want:
            numpy.testing.assert_allclose(got[name], want[name], rtol=2e-3, atol=2e-3, err_msg=name)
        return
    assert_same_bits(got, want, 'batch {}'.format(index))


# each returns a new array (an in-place call may write it) holding ``a``'s values
LAYOUTS = {
    'fortran': lambda a: numpy.asfortranarray(a.copy()),
    'reversed': lambda a: numpy.flip(numpy.flip(a, -1).copy(), -1) if a.ndim else a,
    'every-other': lambda a: _every_other(a),
    'misaligned': lambda a: _misaligned(a),
}


def _misaligned(a):
    """``a``'s values in a C-contiguous view that starts one element into its buffer (not on 16
    bytes: the kernels' vector loads need 16)."""
    if a.ndim == 0:
        return a
    buf = numpy.empty(a.size + 1, a.dtype)
    view = buf[1:].reshape(a.shape)
    view[...] = a
    return view


def _every_other(a):
    """``a``'s values in a view that skips every other element of its first axis."""
    if a.ndim == 0:
        return a
    big = numpy.zeros((2 * a.shape[0],) + a.shape[1:], a.dtype)
    big[::2] = a
    return big[::2]


@given(data=st.data())
def test_layouts_and_thread_counts_give_the_same_bits(backend, data):
    shape, axis = data.draw(shapes(max_elements=6000 if backend.kind == 'numpy' else 2500))
    case = Case(numpy.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1))), shape, axis,
                data.draw(st.sampled_from(DTYPES)), data.draw(st.booleans()), data.draw(family_options()))
    want = run_all(backend, case, reductions=True)
    layout = data.draw(st.sampled_from(sorted(LAYOUTS)))
    assert_same_bits(run_all(backend, case, LAYOUTS[layout], reductions=True), want, layout)
    if backend.kind == 'numpy':
        threads = data.draw(st.sampled_from(THREAD_COUNTS))
        tile = data.draw(st.sampled_from(TILE_ELEMENTS))
        previous = cupy_sce.get_num_threads()
        cupy_sce.set_num_threads(threads)
        try:
            with testing.numpy_tile_elements(tile):
                assert_same_bits(run_all(backend, case, reductions=True), want,
                                 '{} threads, tiles of {}'.format(threads, tile))
        finally:
            cupy_sce.set_num_threads(previous)


@given(data=st.data())
def test_in_place_equals_out_of_place(backend, data):
    """``forward_backward(inplace=True)`` and ``backward(out=logits)`` give the out-of-place bits,
    in every layout; ``forward``'s loss is ``forward_backward``'s."""
    shape, axis = data.draw(shapes(max_elements=6000 if backend.kind == 'numpy' else 2500))
    case = Case(numpy.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1))), shape, axis,
                data.draw(st.sampled_from(DTYPES)), data.draw(st.booleans()), data.draw(family_options()),
                dominated=data.draw(st.booleans()))
    kw = case.keywords(backend)
    lay = LAYOUTS.get(data.draw(st.sampled_from(['c'] + sorted(LAYOUTS))), lambda a: a.copy())
    want = run_all(backend, case)
    with backend.active():
        xp = backend.xp
        logits = lay(case.x) if xp is numpy else xp.asarray(case.x)
        loss, grad = cupy_sce.forward_backward(logits, backend.asarray(case.label), backend.asarray(case.loss_grad),
                                               inplace=True, **kw)
        assert grad is logits
        numpy.testing.assert_array_equal(backend.to_numpy(loss), want['fused_loss'])
        numpy.testing.assert_array_equal(backend.to_numpy(logits), want['fused_grad'])
        logits = lay(case.x) if xp is numpy else xp.asarray(case.x)
        grad = cupy_sce.backward(backend.asarray(case.loss_grad), logits, backend.asarray(want['lse']),
                                 backend.asarray(case.label), out=logits, **kw)
        assert grad is logits
        numpy.testing.assert_array_equal(backend.to_numpy(logits), want['lse_grad'])
    numpy.testing.assert_array_equal(want['loss'], want['fused_loss'])


# ----------------------------------------------------------------------------- accuracy

# Worst error the suite allows, in ulps of the output dtype (README, "Accuracy"): the loss relative
# to loss_scale (the loss plus its sensitivity to rounding the logits' differences); the gradient relative to eps * (p_k * (1 + |y_k - lse|) + t_k) (the softmax
# inherits the rounding of y_k - lse); the lse relative to eps * (|lse| + max_k |y_k|).  The CUDA
# kernels take float exponentials from exp2f (see kernels/sce_common.cuh), whose argument
# y * log2(e) rounds: like the rounding of y_k - y[label], about |y_k - y[label]| * 2**-24 relative
# error in a term, which loss_scale accounts for.  The exact values are computed in long double (x86:
# 64-bit significand), so that float64's errors are measurable; scripts/accuracy.py prints the
# worst errors it finds over many more problems.
ULP_BOUNDS = {
    'numpy': {numpy.float16: (1, 3, 1), BFLOAT16: (1, 3, 1), numpy.float32: (4, 3, 8), numpy.float64: (4, 3, 12)},
    'kernels': {numpy.float16: (1, 3, 1), BFLOAT16: (1, 3, 1), numpy.float32: (8, 3, 12),
                numpy.float64: (8, 3, 16)},
}


def exact_hard(x, label, axis):
    """The hard-label loss, lse and softmax in float64, the loss as ``log1p`` of the other classes'
    ``exp(x_k - x[label])`` (exact where the label dominates; ``log_softmax`` would cancel)."""
    xl = numpy.moveaxis(x.astype(numpy.longdouble), axis, -1)
    lab = numpy.moveaxis(label, axis, -1).astype(numpy.int64)
    picked = numpy.take_along_axis(xl, lab, axis=-1)
    with numpy.errstate(over='ignore'):
        terms = numpy.exp(xl - picked)
    numpy.put_along_axis(terms, lab, 0.0, axis=-1)
    others = terms.sum(-1, keepdims=True)
    loss = numpy.log1p(others)
    lse = picked + loss
    prob = numpy.exp(xl - lse)
    return [numpy.moveaxis(a, -1, axis) for a in (loss, lse, prob, xl)]


def loss_scale(loss, prob, y, label, axis):
    """What the loss's error is measured against: ``loss + sum_{k != label} p_k |y_k - y[label]|``.
    The second term is the loss's sensitivity to rounding the differences ``y_k - y[label]``
    (about ``loss * |y_k - y[label]|`` for a confident prediction: a loss of 1e-20 from terms
    exp(-46) cannot be computed from float32 differences to better than 46 * 2**-24)."""
    spread = numpy.abs(y - numpy.take_along_axis(y, label, axis=axis)) * prob
    numpy.put_along_axis(spread, label, 0.0, axis=axis)
    return numpy.abs(loss) + spread.sum(axis=axis, keepdims=True)


@given(data=st.data())
def test_accuracy_within_the_stated_ulp_bounds(backend, data):
    """Hard labels, no ignored rows, losses from 1e-8 to 1e2: loss, lse and gradient against the
    exact float64 values (ULP_BOUNDS)."""
    shape, axis = data.draw(shapes(max_elements=6000 if backend.kind == 'numpy' else 2500))
    dtype = data.draw(st.sampled_from(DTYPES))
    case = Case(numpy.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1))), shape, axis, dtype, False, {},
                dominated=True, ignore_index=-1)
    case.label = numpy.where(case.label < 0, 0, case.label)
    loss_bound, lse_bound, grad_bound = ULP_BOUNDS['numpy' if backend.kind == 'numpy' else 'kernels'][dtype]
    loss, grad = backend(cupy_sce.forward_backward, case.x, case.label, axis=axis)
    _, lse = backend(cupy_sce.forward, case.x, case.label, axis=axis)
    exact_loss, exact_lse, prob, y = exact_hard(case.x, case.label, case.axis)
    eps, floor = float(finfo(dtype).eps), float(finfo(dtype).tiny)
    scale = loss_scale(exact_loss, prob, y, case.label, case.axis)
    loss_ulps = numpy.abs(loss - exact_loss) / (eps * scale + floor)
    assert loss_ulps.max(initial=0) <= loss_bound, (loss_ulps.max(), loss.ravel()[:4], exact_loss.ravel()[:4])
    if dtype in HALF_DTYPES:  # loss_dtype=float32 keeps what a 16-bit loss rounds away
        loss32, _ = backend(cupy_sce.forward, case.x, case.label, axis=axis, loss_dtype=numpy.float32)
        assert loss32.dtype == numpy.float32
        bound32 = ULP_BOUNDS['numpy' if backend.kind == 'numpy' else 'kernels'][numpy.float32][0]
        loss32_ulps = numpy.abs(loss32 - exact_loss) / (2.0 ** -23 * scale + 2.0 ** -126)
        assert loss32_ulps.max(initial=0) <= bound32, loss32_ulps.max()
    acc_eps = numpy.finfo(lse.dtype).eps
    spread = numpy.abs(y).max(axis=case.axis, keepdims=True)
    lse_ulps = numpy.abs(lse - exact_lse) / (acc_eps * (numpy.abs(exact_lse) + spread) + numpy.finfo(lse.dtype).tiny)
    assert lse_ulps.max(initial=0) <= lse_bound, lse_ulps.max()
    target = numpy.zeros_like(prob)
    numpy.put_along_axis(target, case.label, 1.0, axis=case.axis)
    exact_grad = prob - target
    scale = eps * (prob * (1 + numpy.abs(y - exact_lse)) + target) + floor
    grad_ulps = numpy.abs(grad - exact_grad) / scale
    assert grad_ulps.max(initial=0) <= grad_bound, grad_ulps.max()


def _ulp(exact, dtype):
    """The unit in the last place of ``dtype`` at ``exact`` (the subnormal spacing below the normal
    range)."""
    info = finfo(dtype)
    magnitude = numpy.maximum(numpy.abs(exact), float(info.tiny))
    return 2.0 ** (numpy.floor(numpy.log2(magnitude)) - info.nmant)


def _dense_target(case):
    """The target t_k of every element: the (smoothed) soft label, or (1 - eps) [k == label] + eps / K."""
    eps = case.kw.get('label_smoothing', 0.0)
    K = case.shape[case.axis]
    if case.soft:
        return (1 - eps) * case.label.astype(numpy.float64) + eps / K
    classes = numpy.arange(K).reshape([-1 if d == case.axis else 1 for d in range(len(case.shape))])
    return (1 - eps) * (classes == case.label) + eps / K


@given(data=st.data())
def test_16_bit_gradients_are_rounded_once(backend, data):
    """README, Accuracy (float16 and bfloat16): each gradient element -- the label's ``softmax - 1``
    included, from ``expm1`` of its log-probability -- is formed in float32 and rounded once, so it
    is within 1 ulp of the float64 reference (times loss_grad), out of place and in place, with any
    feature and for confident predictions (losses down to 1e-8).  Where the gradient is a difference
    of nearly equal terms (``softmax * s`` close to a smoothed or soft target t) the float32 error of
    those terms, ``2**-20 * (softmax * s + t) * |loss_grad * w|``, comes on top."""
    shape, axis = data.draw(shapes(max_elements=6000 if backend.kind == 'numpy' else 2500))
    dtype = data.draw(st.sampled_from(HALF_DTYPES))
    case = Case(numpy.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1))), shape, axis, dtype,
                data.draw(st.booleans()), data.draw(family_options()), dominated=data.draw(st.booleans()))
    kw = case.keywords()
    ref = reference_family(case.x, case.label, loss_grad=case.loss_grad, **kw)
    _, grad = backend(cupy_sce.forward_backward, case.x, case.label, case.loss_grad, **kw)
    scale = numpy.abs(case.loss_grad.astype(numpy.float64) * ref['row_weight'])
    terms = numpy.abs(ref['grad']) + 2 * _dense_target(case) * scale  # >= (softmax * s + t) |g w|
    ulp = _ulp(ref['grad'], dtype)
    error = numpy.abs(grad.astype(numpy.float64) - ref['grad'])
    excess = error - (ulp + 2.0 ** -20 * terms)
    worst = numpy.unravel_index(numpy.argmax(excess), excess.shape) if excess.size else ()
    assert excess.max(initial=-1) <= 0, (dtype, kw, worst, error[worst] / ulp[worst])
    with backend.active():
        logits = backend.asarray(case.x.copy())
        cupy_sce.forward_backward(logits, backend.asarray(case.label), backend.asarray(case.loss_grad),
                                  inplace=True, **case.keywords(backend))
        numpy.testing.assert_array_equal(backend.to_numpy(logits), grad)


# ----------------------------------------------------------------------------- inputs and outputs

@given(data=st.data())
def test_inputs_are_never_modified_and_bad_labels_write_nothing(backend, data):
    shape, axis = data.draw(shapes(max_elements=3000))
    case = Case(numpy.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1))), shape, axis,
                data.draw(st.sampled_from(DTYPES)), False, data.draw(family_options()))
    before = {name: getattr(case, name).copy() for name in ('x', 'label', 'loss_grad')}
    outputs = run_all(backend, case)
    for name, value in before.items():
        numpy.testing.assert_array_equal(getattr(case, name), value, err_msg=name)
    # one bad label: IndexError, and neither the logits nor a given out buffer is written
    bad = case.label.copy()
    bad.flat[data.draw(st.integers(0, bad.size - 1))] = case.shape[case.axis] + data.draw(st.integers(0, 5))
    kw = case.keywords(backend)
    with backend.active():
        xp = backend.xp
        logits = xp.asarray(case.x.copy())
        out = xp.asarray(numpy.full(case.x.shape, 7, case.dtype))
        with pytest.raises(IndexError, match='out of range'):
            cupy_sce.backward(None, logits, xp.asarray(outputs['lse']), xp.asarray(bad), out=out, **kw)
        with pytest.raises(IndexError, match='out of range'):
            cupy_sce.backward(None, logits, xp.asarray(outputs['lse']), xp.asarray(bad), out=logits, **kw)
        with pytest.raises(IndexError, match='out of range'):
            cupy_sce.forward_backward(logits, xp.asarray(bad), inplace=True, **kw)
        with pytest.raises(IndexError, match='out of range'):
            cupy_sce.backward(None, logits, xp.asarray(outputs['lse']), xp.asarray(bad), out=logits[...], **kw)
        numpy.testing.assert_array_equal(backend.to_numpy(logits), case.x)
        assert (backend.to_numpy(out) == 7).all()


@given(data=st.data())
def test_an_out_that_overlaps_an_input_is_rejected(backend, data):
    """``out`` sharing memory with the logits other than as the same view, or with another input:
    ValueError, nothing written; the same view (``logits[...]``) is the in-place call."""
    shape, axis = data.draw(shapes(max_elements=3000))
    case = Case(numpy.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1))), shape, axis,
                data.draw(st.sampled_from(DTYPES)), data.draw(st.booleans()), {})
    n = case.x.size
    if n < 2:
        return  # one element cannot overlap itself partly
    shift = data.draw(st.integers(1, n - 1))
    with backend.active():
        xp = backend.xp
        buf = xp.zeros(n + shift, case.dtype)
        buf[:n] = xp.asarray(case.x).ravel()
        logits = buf[:n].reshape(case.x.shape)
        out = buf[shift:shift + n].reshape(case.x.shape)
        _, lse = cupy_sce.forward(logits, xp.asarray(case.label), **case.keywords())
        snapshot = backend.to_numpy(buf).copy()
        with pytest.raises(ValueError, match='overlaps the logits'):
            cupy_sce.backward(None, logits, lse, xp.asarray(case.label), out=out, **case.keywords())
        numpy.testing.assert_array_equal(backend.to_numpy(buf), snapshot)
        # an out that overlaps another input (the lse, the loss_grad) is refused too
        out = xp.empty(case.x.shape, case.dtype)
        flat_out = out.reshape(-1)
        with pytest.raises(ValueError, match='out overlaps loss_grad'):
            cupy_sce.backward(flat_out[:case.loss_grad.size].reshape(case.loss_grad.shape), logits, lse,
                              xp.asarray(case.label), out=out, **case.keywords())
        if case.dtype == lse.dtype:
            with pytest.raises(ValueError, match='out overlaps lse'):
                cupy_sce.backward(None, logits, flat_out[:lse.size].reshape(lse.shape), xp.asarray(case.label),
                                  out=out, **case.keywords())


# ----------------------------------------------------------------------------- regressions (issue 11)

def test_class_axis_not_last_is_thread_count_and_batch_invariant(backend):
    """Defect 1: with the class axis not last, the thread count, a column's batch and the path
    (fused, forward, in place) changed results."""
    x = (numpy.random.default_rng(15).standard_normal((500, 777)) * 4).astype(numpy.float32)
    full = backend(cupy_sce.logsumexp, x, axis=0)
    if backend.kind == 'numpy':
        previous = cupy_sce.get_num_threads()
        try:
            for threads in THREAD_COUNTS:
                cupy_sce.set_num_threads(threads)
                numpy.testing.assert_array_equal(backend(cupy_sce.logsumexp, x, axis=0), full)
        finally:
            cupy_sce.set_num_threads(previous)
        # a column alone: contiguous rows now, summed in the same order
        for j in (0, 1, 100, 776):
            assert backend(cupy_sce.logsumexp, x[:, j:j + 1], axis=0)[0, 0] == full[0, j]
    for j0, j1 in ((0, 2), (5, 300), (770, 777)):  # strided sub-batches
        numpy.testing.assert_array_equal(backend(cupy_sce.logsumexp, x[:, j0:j1], axis=0), full[:, j0:j1])
    rng = numpy.random.default_rng(1)
    x = rng.standard_normal((1, 128256, 2)).astype(numpy.float32)
    label = rng.integers(0, 128256, (1, 1, 2))
    loss, grad = backend(cupy_sce.forward_backward, x, label, axis=1)
    numpy.testing.assert_array_equal(backend(cupy_sce.forward, x, label, axis=1)[0], loss)
    with backend.active():
        logits = backend.asarray(x.copy())
        in_place_loss, _ = cupy_sce.forward_backward(logits, backend.asarray(label), axis=1, inplace=True)
        numpy.testing.assert_array_equal(backend.to_numpy(in_place_loss), loss)
        numpy.testing.assert_array_equal(backend.to_numpy(logits), grad)


def test_fused_loss_is_accurate_on_a_long_strided_axis(backend):
    """Defect 2: shape (1, 2000000, 2), axis 1: the fused loss had relative error 6e-6."""
    rng = numpy.random.default_rng(2)
    x = rng.standard_normal((1, 2000000, 2)).astype(numpy.float32)
    label = rng.integers(0, 2000000, (1, 1, 2))
    exact, _, _, _ = exact_hard(x, label, 1)
    loss, _ = backend(cupy_sce.forward_backward, x, label, axis=1)
    numpy.testing.assert_allclose(loss, exact, rtol=4e-7)
    numpy.testing.assert_array_equal(backend(cupy_sce.forward, x, label, axis=1)[0], loss)


@pytest.mark.parametrize('dtype', DTYPES)
def test_a_confident_prediction_keeps_its_digits(backend, dtype):
    """Defect 3: the loss of a row whose label dominates is formed without cancellation (log1p of
    the other classes' terms), down to losses of 1e-8."""
    row = numpy.array([[-2.1530619, 3.080596, -3.4468932]], dtype)
    loss = backend(cupy_sce.softmax_with_cross_entropy, row, numpy.array([[1]]))
    exact = exact_hard(row, numpy.array([[1]]), 1)[0]
    bound = ULP_BOUNDS['numpy' if backend.kind == 'numpy' else 'kernels'][dtype][0]
    assert abs(loss[0, 0] - exact[0, 0]) <= bound * float(finfo(dtype).eps) * exact[0, 0]
    if dtype == numpy.float16:
        return  # a float16 loss below 6e-8 is 0
    x = numpy.array([[0.0, -18.0, -19.0, -20.0, -21.0]], dtype)
    exact = exact_hard(x, numpy.array([[0]]), 1)[0][0, 0]
    assert 1e-8 < exact < 3e-8
    for fn in (cupy_sce.forward, cupy_sce.forward_backward):
        loss = backend(fn, x, numpy.array([[0]]))[0][0, 0]
        assert abs(loss - exact) <= bound * float(finfo(dtype).eps) * exact, (fn.__name__, loss, exact)


def test_an_out_shifted_by_one_element_is_rejected(backend):
    """Defect 4: ``out`` one element past the logits in the same buffer."""
    n, k = 300, 1000
    buf = numpy.random.default_rng(4).standard_normal(n * k + 1).astype(numpy.float32)
    label = numpy.random.default_rng(5).integers(0, k, (n, 1))
    with backend.active():
        x = buf[:-1].reshape(n, k)
        _, lse = cupy_sce.forward(x, label)
        before = buf.copy()
        with pytest.raises(ValueError, match='overlaps the logits'):
            cupy_sce.backward(None, x, lse, label, out=buf[1:].reshape(n, k))
        numpy.testing.assert_array_equal(buf, before)


def test_a_bad_label_writes_nothing_through_any_out(backend):
    """Defect 5 (and a separate ``out``): a bad label raises before the gradient is written."""
    rng = numpy.random.default_rng(6)
    x = rng.standard_normal((30, 10)).astype(numpy.float32)
    label = rng.integers(0, 10, (30, 1))
    bad = label.copy()
    bad[5] = 99
    with backend.active():
        _, lse = cupy_sce.forward(x, label)
        for out in (x[...], x[:], numpy.full_like(x, 7)):
            out_before, x_before = out.copy(), x.copy()
            with pytest.raises(IndexError, match='label value 99 at position'):
                cupy_sce.backward(None, x, lse, bad, out=out)
            numpy.testing.assert_array_equal(x, x_before)
            numpy.testing.assert_array_equal(out, out_before)


@pytest.mark.parametrize('dtype,K', [(numpy.float32, 40), (numpy.float32, 4096), (numpy.float32, 8192),
                                     (numpy.float16, 8192), (BFLOAT16, 8192), (numpy.float64, 3000),
                                     (numpy.float32, 515)])
def test_row_max_keeps_a_nan_from_any_lane(backend, dtype, K):
    """Row r holds one NaN, at class r * step: every thread of a row (every lane of a warp, every
    warp of a block) holds the NaN in some row, and every row's max must be NaN."""
    step = 8
    n = min(K // step, 300)
    x = numpy.random.default_rng(7).standard_normal((n, K)).astype(dtype)
    x[numpy.arange(n), numpy.arange(n) * step] = numpy.nan
    assert numpy.isnan(backend(cupy_sce.row_max, x)).all()
    assert numpy.isnan(backend(cupy_sce.logsumexp, x)).all()
    # strided rows: the NaN in every slice of the class axis
    xt = numpy.ascontiguousarray(x.T)
    assert numpy.isnan(backend(cupy_sce.row_max, xt, axis=0)).all()


def test_scratch_memory_is_bounded_and_released(numpy_backend):
    """README, Memory: a call needs no N x K temporary; the NumPy backend's per-thread scratch (at
    most 9 tiles of 4 MiB a thread in float32) is allocated by the first call, kept for the next
    ones, and freed by ``release_scratch``."""
    import gc
    import tracemalloc
    rng = numpy.random.default_rng(8)
    x = rng.standard_normal((4096, 4000)).astype(numpy.float32)
    label = rng.integers(0, 4000, (4096, 1))
    kw = dict(weight=numpy.ones(4000, numpy.float32), label_smoothing=0.1, z_loss=1e-4, softcap=20.0)
    cupy_sce.release_scratch()
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        outputs = cupy_sce.forward_backward(x, label, **kw)
        current, peak = tracemalloc.get_traced_memory()
        returned = sum(o.nbytes for o in outputs)
        first_extra, held = peak - base - returned, current - base - returned
        assert 0 < first_extra <= cupy_sce.get_num_threads() * 9 * 4 * 2 ** 20 + 2 ** 20
        assert first_extra < x.nbytes / 2  # no N x K temporary
        del outputs
        tracemalloc.reset_peak()
        outputs = cupy_sce.forward_backward(x, label, **kw)
        later_extra = tracemalloc.get_traced_memory()[1] - base - held - returned
        assert later_extra <= 2 ** 20  # the scratch is reused
        del outputs
        cupy_sce.release_scratch()
        gc.collect()
        assert tracemalloc.get_traced_memory()[0] - base < 2 ** 20  # and freed
    finally:
        tracemalloc.stop()
