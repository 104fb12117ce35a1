"""The NumPy backend's compiled CPU kernels (``cupy_sce._cpu_kernels``, numba) on their own.

The semantic suites run them as the ``numba`` backend; here: their elementary functions against
NumPy in extended precision, their agreement with the pure-NumPy steps on special values, the
rows of a small problem (run as one tile) against the same rows in a large tiled, threaded one,
and the switch that picks them.
"""
import numpy
import pytest
from hypothesis import given, strategies as st

import cupy_sce
from cupy_sce import _numpy_backend
from helpers import cpu_kernels, skip_without_numba


@pytest.fixture(scope='module')
def ck():
    skip_without_numba()
    from cupy_sce import _cpu_kernels
    return _cpu_kernels


def _elementwise(ck, name, fastmath):
    """A vectorizable loop applying ``name`` under the kernels' fastmath flags (``_exp`` runs inside
    the sums' ``reassoc`` loops too: its rounding trick must survive them)."""
    import numba
    function = getattr(ck, name)

    @numba.njit(error_model='numpy', fastmath=fastmath)
    def apply(values, out):
        for i in range(values.shape[0]):
            out[i] = function(values[i])
    return apply


def _ulps(got, want):
    """Distance in representable values (-0.0 and 0.0 are one value)."""
    ints = numpy.int32 if got.dtype == numpy.float32 else numpy.int64

    def ordered(v):
        bits = v.view(ints).astype(object if ints is numpy.int64 else numpy.int64)
        magnitude = bits & numpy.iinfo(ints).max
        return numpy.where(bits < 0, -magnitude, magnitude)
    return numpy.abs(ordered(got) - ordered(want)).astype(numpy.float64)


@pytest.mark.filterwarnings('ignore::numba.core.errors.NumbaIRAssumptionWarning')  # see _compiled_quietly
@pytest.mark.parametrize('fastmath', ['contract', 'contract,reassoc'])
@pytest.mark.parametrize('dtype', [numpy.float32, numpy.float64])
@pytest.mark.parametrize('name, domain', [('_exp', (-800.0, 710.0)), ('_log1p', (-1.0, 1e300)),
                                          ('_expm1', (-800.0, 710.0))])
def test_elementary_functions_are_within_two_ulps(ck, name, domain, dtype, fastmath):
    rng = numpy.random.default_rng(7)
    lo, hi = domain
    tiny = numpy.finfo(dtype).tiny
    values = numpy.concatenate([
        rng.uniform(max(lo, -110.0 if dtype == numpy.float32 else lo), min(hi, 90.0), 200000),
        rng.uniform(-1.0, 1.0, 100000),
        numpy.exp(rng.uniform(-700, 700, 100000)),  # log1p's long range, exp's overflow
        -numpy.exp(rng.uniform(-700, 6.5, 100000)),
        [0.0, -0.0, tiny, -tiny, tiny / 8, 1e-30, -1e-30, 0.6931471805599453, -0.6931471805599453,
         -1.0, 88.7, 709.7, -87.3, -103.9, -745.0, numpy.inf, -numpy.inf, numpy.nan]])
    with numpy.errstate(all='ignore'):
        values = values.astype(dtype)
        values = values[(values >= lo) | numpy.isnan(values)]
        reference = {'_exp': numpy.exp, '_log1p': numpy.log1p, '_expm1': numpy.expm1}[name]
        want = reference(values.astype(numpy.longdouble)).astype(dtype)
    got = numpy.empty_like(values)
    _elementwise(ck, name, set(fastmath.split(',')))(values, got)
    finite = numpy.isfinite(want)
    numpy.testing.assert_array_equal(got[~finite], want[~finite])  # inf, -inf and NaN exactly
    assert numpy.isfinite(got[finite]).all()
    worst = _ulps(got[finite], want[finite]).max()
    assert worst <= 2, '{} off by {} ulps'.format(name, worst)


def _special_logits(rng, n, K, dtype):
    x = (rng.standard_normal((n, K)) * 3).astype(dtype)
    specials = [numpy.nan, numpy.inf, -numpy.inf, 1e4, -1e4, 80.0, -200.0]
    rows = rng.choice(n, size=min(n, 3 * len(specials)), replace=False)
    for i, row in enumerate(rows):
        value = specials[i % len(specials)]
        columns = rng.choice(K, size=min(K, 1 + i % 3), replace=False)
        if i >= 2 * len(specials):
            x[row] = value  # a whole row of it (all -inf, all NaN, a shared offset...)
        elif abs(value) == 1e4 or value == -200.0:
            x[row] += numpy.asarray(value, dtype)  # a large offset shared by the row
        else:
            x[row, columns] = value
    return x


@given(data=st.data())
def test_special_values_match_the_numpy_steps(ck, data):
    dtype = data.draw(st.sampled_from([numpy.float32, numpy.float64]))
    K = data.draw(st.sampled_from([1, 2, 7, 64, 65, 300]))
    n = data.draw(st.integers(1, 40))
    rng = numpy.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    x = _special_logits(rng, n, K, dtype)
    label = rng.integers(0, K, (n, 1))
    label[rng.random(n) < 0.2] = -100
    options = data.draw(st.sampled_from([{}, dict(label_smoothing=0.2), dict(z_loss=1e-3),
                                         dict(weight=rng.uniform(0.5, 2.0, K).astype(dtype), label_smoothing=0.1,
                                              z_loss=1e-4)]))

    def outputs():
        loss, lse = cupy_sce.forward(x, label, **options)
        loss_fb, grad = cupy_sce.forward_backward(x, label, **options)
        grad_lse = cupy_sce.backward(None, x, lse, label, **options)
        return loss, lse, loss_fb, grad, grad_lse
    with cpu_kernels('numpy'):
        want = outputs()
    with cpu_kernels('numba'):
        got = outputs()
    tolerance = dict(rtol=2e-5, atol=1e-6) if dtype == numpy.float32 else dict(rtol=1e-12, atol=1e-14)
    for name, g, w in zip(('loss', 'lse', 'loss_fb', 'grad', 'grad_from_lse'), got, want):
        numpy.testing.assert_array_equal(numpy.isnan(g), numpy.isnan(w), err_msg=name)
        numpy.testing.assert_allclose(g, w, err_msg=name, **tolerance)


@pytest.mark.parametrize('K', [10, 64, 65, 1000])
@pytest.mark.parametrize('dtype', [numpy.float16, numpy.float32, numpy.float64])
def test_small_problems_give_the_tiled_bits(ck, K, dtype):
    # a small problem runs as one tile without the tile machinery (_compiled_whole); its rows
    # must be the bits the same rows get inside a large problem, tiled and threaded
    rng = numpy.random.default_rng(K)
    big = (rng.standard_normal((max(300000 // K, 200), K)) * 3).astype(dtype)
    label = rng.integers(0, K, (big.shape[0], 1))
    label[::7] = -100
    weight = rng.uniform(0.5, 2.0, K).astype(dtype)
    options = dict(weight=weight, label_smoothing=0.1, z_loss=1e-3)
    pick = numpy.array([0, 5, 7, big.shape[0] // 2, big.shape[0] - 1])

    def outputs(x, lab):
        loss, lse = cupy_sce.forward(x, lab, **options)
        loss_fb, grad = cupy_sce.forward_backward(x, lab, **options)
        in_place = x.copy()
        loss_in_place, _ = cupy_sce.forward_backward(in_place, lab, inplace=True, **options)
        grad_lse = cupy_sce.backward(None, x, lse, lab, **options)
        plain = cupy_sce.softmax_with_cross_entropy(x, lab, return_softmax=True)
        return loss, lse, loss_fb, grad, loss_in_place, in_place, grad_lse, *plain
    try:
        cupy_sce.set_num_threads(2)
        with cpu_kernels('numba'):
            whole = outputs(big, label)
            small = outputs(big[pick], label[pick])
    finally:
        cupy_sce.set_num_threads(None)
    names = ('loss', 'lse', 'loss_fb', 'grad', 'loss in place', 'grad in place', 'grad_from_lse', 'swce loss',
             'softmax')
    for name, w, s in zip(names, whole, small):
        numpy.testing.assert_array_equal(s, w[pick], err_msg=name)
    # in place and out of place agree bit for bit
    numpy.testing.assert_array_equal(whole[4], whole[2])
    numpy.testing.assert_array_equal(whole[5], whole[3])


def test_strided_rows_give_the_contiguous_bits(ck):
    # a row's kernel depends on K alone: the class axis elsewhere gives the same bits
    rng = numpy.random.default_rng(3)
    for K in (10, 100):
        x = (rng.standard_normal((6, K, 5)) * 3).astype(numpy.float32)
        label = rng.integers(0, K, (6, 1, 5))
        with cpu_kernels('numba'):
            strided = cupy_sce.forward_backward(x, label, axis=1, label_smoothing=0.1)
            moved = cupy_sce.forward_backward(numpy.ascontiguousarray(numpy.moveaxis(x, 1, -1)),
                                              numpy.moveaxis(label, 1, -1), label_smoothing=0.1)
        numpy.testing.assert_array_equal(numpy.moveaxis(strided[0], 1, -1), moved[0])
        numpy.testing.assert_array_equal(numpy.moveaxis(strided[1], 1, -1), moved[1])


def test_what_takes_the_compiled_path(ck):
    x = numpy.zeros((4, 5), numpy.float32)
    label = numpy.zeros((4, 1), numpy.int64)
    with cpu_kernels('numba'):
        assert cupy_sce.get_cpu_kernels() == 'numba'
        for options, compiled in [({}, True), (dict(weight=numpy.ones(5, numpy.float32), label_smoothing=0.1,
                                                    z_loss=1.0), True),
                                  (dict(softcap=5.0), False)]:
            p = cupy_sce._api._Problem(numpy, x, label, False, -100, -1, **options)
            assert (_numpy_backend._compiled_for(p) is not None) == compiled, options
        p = cupy_sce._api._Problem(numpy, x, numpy.full((4, 5), 0.2, numpy.float32), True, -100, -1)
        assert _numpy_backend._compiled_for(p) is None  # soft labels: the NumPy steps
    with cpu_kernels('numpy'):
        assert cupy_sce.get_cpu_kernels() == 'numpy'
        assert _numpy_backend._compiled_for(cupy_sce._api._Problem(numpy, x, label, False, -100, -1)) is None


def test_the_switch_checks_its_argument(monkeypatch):
    for bad in ('fast', 'NUMBA', 1, True):
        with pytest.raises(ValueError, match='cpu kernels must be one of'):
            cupy_sce.set_cpu_kernels(bad)
    def from_environment(value):  # the variable is read again after set_cpu_kernels
        monkeypatch.setenv('CUPY_SCE_CPU_KERNELS', value)
        cupy_sce.set_cpu_kernels(None)
        return cupy_sce.get_cpu_kernels()
    try:
        with pytest.raises(ValueError, match="CUPY_SCE_CPU_KERNELS must be one of .* got 'fastest'"):
            from_environment('fastest')
        assert from_environment('numpy') == 'numpy'
        # without numba: 'auto' falls back to the NumPy steps, 'numba' says what is missing
        monkeypatch.setattr(_numpy_backend, '_cpu_kernels_module', False)
        assert from_environment('auto') == 'numpy'
        with pytest.raises(ImportError, match='needs numba'):
            cupy_sce.set_cpu_kernels('numba')
        with pytest.raises(ImportError, match='needs numba'):
            from_environment('numba')
    finally:
        monkeypatch.undo()
        cupy_sce.set_cpu_kernels(None)


@pytest.mark.parametrize('K', [3, 100])  # columns and rows
def test_infinite_loss_grad_and_lse_give_the_featureless_gradient(ck, K):
    # a feature that is off adds 0 (selected), not 0 * inf = NaN: an overflowing loss scale or an
    # infinite lse gives what the NumPy steps (and the CUDA kernels) give
    x = numpy.tile(numpy.arange(K, dtype=numpy.float32), (4, 1))
    label = numpy.array([0, 1, 2, 0])
    loss_grad = numpy.array([numpy.inf, 1e38, -numpy.inf, 1.0], numpy.float32)
    lse = numpy.array([[numpy.inf], [-numpy.inf], [numpy.inf], [1e3]], numpy.float32)
    weight = numpy.full(K, 10, numpy.float32)
    results = {}
    for kind in ('numpy', 'numba'):
        with cpu_kernels(kind):
            results[kind] = (cupy_sce.forward_backward(x, label, loss_grad)[1],
                             cupy_sce.forward_backward(x, label, loss_grad, weight=weight)[1],
                             cupy_sce.backward(None, x, lse, label), cupy_sce.backward(loss_grad, x, lse, label))
    for got, want in zip(results['numba'], results['numpy']):
        numpy.testing.assert_array_equal(numpy.isnan(got), numpy.isnan(want))
        numpy.testing.assert_allclose(got, want, rtol=1e-6)
    assert not numpy.isnan(results['numba'][0][:2]).any()
