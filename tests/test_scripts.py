"""The shipped scripts, run as a user runs them (subprocesses)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args, timeout=300, env=None):
    return subprocess.run([sys.executable] + list(args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_gradcheck_script_passes():
    result = run_script('scripts/gradcheck.py')
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ['case', 'backend']
    assert sum(' PASS' in line for line in lines) >= 50
    assert 'FAIL' not in result.stdout
    assert lines[-1].startswith('{} passed, 0 failed'.format(sum(' PASS' in line for line in lines)))


def test_gradcheck_detects_a_wrong_gradient(monkeypatch):
    """The checker itself must be able to fail: feed it Paddle's soft-label gradient."""
    import numpy
    import cupy_sce
    from cupy_sce import gradcheck

    def paddle_soft_grad(xp, x, label, loss_grad, soft_label, ignore_index, axis, path):
        _, softmax = cupy_sce.softmax_with_cross_entropy(x, label, soft_label=True, axis=axis,
                                                         return_softmax=True)
        return (softmax - label) * loss_grad

    monkeypatch.setattr(gradcheck, 'analytic_gradient', paddle_soft_grad)
    result = gradcheck.check_gradient((4, 5), soft_label=True, normalized=False)
    assert not result.passed and result.max_abs_err > 1e-2
    ok = gradcheck.check_gradient((4, 5), soft_label=True, normalized=True)
    assert ok.passed  # for rows summing to 1 the two gradients agree
    assert numpy.isfinite(ok.max_rel_err)


def test_gradcheck_unknown_backend_exits_nonzero():
    result = run_script('scripts/gradcheck.py', '--backend', 'cupy')
    try:
        import cupy
        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        has_gpu = False
    if has_gpu:
        pytest.skip('a GPU is present: the cupy backend is available')
    assert result.returncode == 2 and 'not available' in result.stdout


def test_bench_quick_smoke(tmp_path):
    """bench.py --quick runs end to end and writes its CSV (no timing asserts: a smoke test)."""
    env = dict(os.environ, CUPY_SCE_NUM_THREADS='1')
    result = run_script('scripts/bench.py', '--quick', '--repeat', '1', '--out', str(tmp_path), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if ' GB/s' in line]
    assert len(rows) == 4 * 5, result.stdout  # 4 shapes x 5 operations
    assert 'extra peak' in result.stdout and 'x vs' not in result.stdout
    csv_text = (tmp_path / 'bench.csv').read_text().splitlines()
    assert csv_text[0].startswith('device,case,op,median_ms') and len(csv_text) == 21
