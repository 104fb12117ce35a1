#!/usr/bin/env python
"""Check cupy_sce's analytic gradients against central finite differences (float64).

Runs every case of ``cupy_sce.gradcheck.default_cases()`` and, for the fused linear + cross
entropy (grad_hidden, grad_weight, grad_bias), ``linear_cases()`` on numpy, and on cupy when a
GPU is present.  Prints a table and exits 1 on any failure.

    python scripts/gradcheck.py [--backend numpy|cupy|all]
"""
import argparse
import sys
import time

import numpy

from cupy_sce.gradcheck import check_gradient, check_linear_gradient, default_cases, linear_cases


def available_backends():
    backends = [('numpy', numpy)]
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            backends.append(('cupy', cupy))
    except Exception:  # no CuPy, no driver or no device: numpy only
        pass
    return backends


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--backend', choices=('numpy', 'cupy', 'all'), default='all')
    args = parser.parse_args(argv)
    backends = [b for b in available_backends() if args.backend in ('all', b[0])]
    if not backends:
        print('backend {} is not available (no GPU?)'.format(args.backend))
        return 2
    start = time.perf_counter()
    failures = 0
    rows = 0
    print('{:<48} {:<7} {:>12} {:>12}  {}'.format(
        'case', 'backend', 'max abs err', 'max rel err', 'result'))
    for name, xp in backends:
        checks = [(case, check_gradient, kwargs) for case, kwargs in default_cases()]
        checks += [(case, check_linear_gradient, kwargs) for case, kwargs in linear_cases()]
        for case, check, kwargs in checks:
            result = check(xp=xp, **kwargs)
            failures += not result.passed
            rows += 1
            print('{:<48} {:<7} {:>12.3e} {:>12.3e}  {}'.format(
                case, name, result.max_abs_err, result.max_rel_err,
                'PASS' if result.passed else 'FAIL'))
    print('{} passed, {} failed ({:.1f} s, backends: {})'.format(
        rows - failures, failures, time.perf_counter() - start, ', '.join(b[0] for b in backends)))
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
