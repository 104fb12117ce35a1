"""Worst errors of the hard-label loss, lse and gradient against exact float64 values, in ulps.

    python scripts/accuracy.py [--backends numpy numba harness cupy] [--problems 200] [--seed 0]

Random problems (K from 1 to 4097, class axis last or first), every row's label raised so that its
loss is about 10**u with u uniform in [-8, 2] (confident predictions included), in float16,
bfloat16 (with ml_dtypes installed), float32 and float64.  The measures are those of the README's
accuracy table (and of tests/test_contract.py, which enforces the bounds): the loss relative to
``loss + sum_{k != label} p_k |x_k - x[label]|`` (its sensitivity to rounding the logits'
differences), the lse relative to ``|lse| + max_k |x_k|``, the gradient relative to
``p_k (1 + |x_k - lse|) + t_k``; in ulps (eps) of the output dtype (the lse: of the compute dtype).
The last column is the gradient's error in units in the last place of each exact element (the
16-bit dtypes' contract: at most 1).  ``numpy`` is the NumPy backend on its pure-NumPy kernels,
``numba`` on its compiled ones (needs numba), ``harness`` runs the CUDA kernels on the CPU (needs
g++), ``cupy`` on a GPU.
"""
import argparse
import contextlib

import numpy

import cupy_sce
from cupy_sce import _dtypes, testing

DTYPES = (numpy.float16,) + ((_dtypes.bfloat16(),) if _dtypes.bfloat16_available() else ()) + (
    numpy.float32, numpy.float64)


def finfo(dtype):
    import ml_dtypes  # numpy.finfo does not know bfloat16
    return ml_dtypes.finfo(dtype) if numpy.dtype(dtype).name == 'bfloat16' else numpy.finfo(dtype)
KS = (1, 2, 3, 7, 64, 65, 500, 1000, 2048, 4097)


def problem(rng, dtype):
    K = int(rng.choice(KS))
    n = int(rng.integers(1, max(2, 20000 // K)))
    x = rng.standard_normal((n, K)) * float(rng.choice([1, 3, 10]))
    label = rng.integers(0, K, (n, 1))
    others = x.copy()
    numpy.put_along_axis(others, label, -numpy.inf, axis=1)
    with numpy.errstate(divide='ignore'):
        lse_others = numpy.logaddexp.reduce(others, axis=1, keepdims=True)
        loss = 10 ** rng.uniform(-8, 2, (n, 1))
        value = numpy.where(numpy.isfinite(lse_others), lse_others - numpy.log(numpy.expm1(loss)), 0.0)
    numpy.put_along_axis(x, label, value, axis=1)
    x = x.astype(dtype)
    if rng.random() < 0.5:  # the class axis first: strided rows
        return numpy.ascontiguousarray(x.T), label.T, 0
    return x, label, 1


def exact(x, label, axis):
    """Loss as log1p of the other classes' exp(x_k - x[label]); lse; softmax; logits (float64)."""
    xl = numpy.moveaxis(x.astype(numpy.longdouble), axis, -1)
    lab = numpy.moveaxis(label, axis, -1)
    picked = numpy.take_along_axis(xl, lab, axis=-1)
    terms = numpy.exp(xl - picked)
    numpy.put_along_axis(terms, lab, 0.0, axis=-1)
    loss = numpy.log1p(terms.sum(-1, keepdims=True))
    lse = picked + loss
    return [numpy.moveaxis(a, -1, axis) for a in (loss, lse, numpy.exp(xl - lse), xl)]


def loss_scale(loss, prob, y, label, axis):
    """``loss + sum_{k != label} p_k |y_k - y[label]|``: the loss plus its sensitivity to rounding
    the differences of the logits (a loss of 1e-20 from terms exp(-46) cannot be formed from float32
    differences to better than 46 * 2**-24 relative)."""
    spread = numpy.abs(y - numpy.take_along_axis(y, label, axis=axis)) * prob
    numpy.put_along_axis(spread, label, 0.0, axis=axis)
    return numpy.abs(loss) + spread.sum(axis=axis, keepdims=True)


def worst_errors(run, rng, dtype, n_problems):
    info = finfo(dtype)
    eps, floor = float(info.eps), float(info.tiny)
    worst = [0.0, 0.0, 0.0, 0.0]
    for _ in range(n_problems):
        x, label, axis = problem(rng, dtype)
        loss, grad = run(cupy_sce.forward_backward, x, label, axis=axis)
        lse = run(cupy_sce.forward, x, label, axis=axis)[1]
        exact_loss, exact_lse, prob, y = exact(x, label, axis)
        target = numpy.zeros_like(prob)
        numpy.put_along_axis(target, label, 1.0, axis=axis)
        acc = numpy.finfo(lse.dtype)
        exact_grad = prob - target
        ulp = 2.0 ** (numpy.floor(numpy.log2(numpy.maximum(numpy.abs(exact_grad), floor))) - info.nmant)
        errors = (
            numpy.abs(loss - exact_loss) / (eps * loss_scale(exact_loss, prob, y, label, axis) + floor),
            numpy.abs(lse - exact_lse) / (acc.eps * (numpy.abs(exact_lse) + numpy.abs(y).max(axis, keepdims=True))
                                          + acc.tiny),
            numpy.abs(grad - exact_grad) / (eps * (prob * (1 + numpy.abs(y - exact_lse)) + target) + floor),
            numpy.abs(grad - exact_grad) / ulp,
        )
        worst = [max(w, float(e.max())) for w, e in zip(worst, errors)]
    return worst


def runner(name):
    """call(fn, *numpy args, **kw) -> numpy results, on backend ``name``."""
    if name in ('numpy', 'numba'):
        @contextlib.contextmanager
        def context():
            cupy_sce.set_cpu_kernels(name)
            try:
                yield
            finally:
                cupy_sce.set_cpu_kernels(None)
        to_device, to_host = (lambda a: a), (lambda a: a)
    elif name == 'harness':
        from cupy_sce.testing import harness
        backend = harness.backend()
        context, to_device, to_host = (lambda: testing.use_backend(backend)), (lambda a: a), (lambda a: a)
    else:
        import cupy
        context, to_device, to_host = contextlib.nullcontext, cupy.asarray, cupy.asnumpy

    def call(fn, *args, **kw):
        with context():
            result = fn(*[to_device(a) for a in args], **kw)
        return tuple(to_host(r) for r in result)
    return call


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--backends', nargs='+', default=['numpy', 'numba', 'harness'],
                        choices=['numpy', 'numba', 'harness', 'cupy'])
    parser.add_argument('--problems', type=int, default=200, help='problems per backend and dtype')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    print('{:<8} {:<8} {:>12} {:>10} {:>14} {:>16}'.format('backend', 'dtype', 'loss ulps', 'lse ulps',
                                                          'gradient ulps', 'grad ulp(exact)'))
    for name in args.backends:
        run = runner(name)
        for dtype in DTYPES:
            loss, lse, grad, grad_ulp = worst_errors(run, numpy.random.default_rng(args.seed), dtype, args.problems)
            print('{:<8} {:<8} {:12.2f} {:10.2f} {:14.2f} {:16.2f}'.format(
                name, numpy.dtype(dtype).name, loss, lse, grad, grad_ulp), flush=True)


if __name__ == '__main__':
    main()
