"""The shipped scripts, run as a user runs them (subprocesses)."""
import importlib.util
import os
import subprocess
import sys

import pytest

from cupy_sce.testing import harness

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


def test_accuracy_script_reports_every_dtype_within_the_readme_bounds():
    backends = ['numpy'] + (['numba'] if importlib.util.find_spec('numba') else []) + (
        [] if harness.unavailable_reason() else ['harness'])
    result = run_script('scripts/accuracy.py', '--problems', '4', '--backends', *backends)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    dtypes = ('float16', 'bfloat16', 'float32', 'float64')
    assert [r[:2] for r in rows] == [[b, d] for b in backends for d in dtypes]
    # the README's bounds (loss, lse, gradient; 16-bit: the gradient within 1 ulp of each element)
    inf = float('inf')
    bounds = {'numpy': [(1, 3, 1, 1), (1, 3, 1, 1), (4, 3, 8, inf), (4, 3, 12, inf)],
              'numba': [(1, 3, 1, 1), (1, 3, 1, 1), (4, 3, 8, inf), (4, 3, 12, inf)],  # the NumPy backend's
              'harness': [(1, 3, 1, 1), (1, 3, 1, 1), (8, 3, 12, inf), (8, 3, 16, inf)]}
    for i, row in enumerate(rows):
        errors = [float(v) for v in row[2:]]
        assert len(errors) == 4 and all(0 <= e <= b for e, b in zip(errors, bounds[row[0]][i % 4])), row


def test_gradcheck_detects_a_wrong_gradient(monkeypatch):
    """The checker itself must be able to fail: feed it Paddle's soft-label gradient."""
    import numpy
    import cupy_sce
    from cupy_sce import gradcheck

    def paddle_soft_grad(xp, x, label, loss_grad, soft_label, ignore_index, axis, path, family=None):
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
    feature_rows = [line for line in rows if 'fwd+bwd mean, ' in line]
    bf16_rows = [line for line in rows if ' bfloat16 ' in line]
    assert len(bf16_rows) == 3 and '# check 512x32000 bfloat16' in result.stdout, result.stdout
    assert len(rows) - len(feature_rows) - len(bf16_rows) == 4 * 5, result.stdout  # 4 shapes x 5 operations
    # the feature costs on each of the NumPy backend's kernels: the compiled ones (with numba) and pure NumPy
    kernels = 2 if 'CPU kernels: numba' in result.stdout else 1
    assert len(feature_rows) == 7 * kernels and all(' cost ' in line for line in feature_rows), result.stdout
    if kernels == 2:  # the pure-NumPy kernels timed next to the compiled ones
        assert 'cupy_sce numpy kernels' in result.stdout
    assert 'extra peak' in result.stdout and 'x vs' not in result.stdout
    # the per-call overhead of 3 small shapes x 4 calls, with the CuPy backend's host time
    call_rows = [line for line in result.stdout.splitlines() if ' us  cupy host path ' in line]
    assert len(call_rows) == 3 * 4 and all('numpy naive' in line for line in call_rows), result.stdout
    csv_text = (tmp_path / 'bench.csv').read_text().splitlines()
    # with PyTorch and Paddle installed, a bridge row per shape each
    bridge_rows = 3 * (('torch bridge fwd+bwd' in result.stdout) + ('paddle bridge fwd+bwd' in result.stdout))
    assert csv_text[0].startswith('device,case,op,median_ms')
    assert len(csv_text) == 1 + 20 + 3 + 7 * kernels + 12 + bridge_rows + 1
    assert sum(',call ' in line for line in csv_text) == 12 + bridge_rows
    assert 'linear+CE fwd+bwd' in result.stdout and sum(',linear+cross entropy' in line for line in csv_text) == 1


def test_bench_scale_out_smoke(tmp_path):
    """bench.py --scale-out --quick: the Dask rows and the vocab-parallel row under mpiexec -n 2."""
    result = run_script('scripts/bench.py', '--scale-out', '--quick', '--repeat', '1', '--out', str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if ' GB/s' in line]
    assert sum(' dask chunks ' in line and 'single array' in line for line in rows) == 4, result.stdout
    assert sum('vocab-parallel 2 ranks' in line and '1 process, vocab_parallel' in line for line in rows) == 1, \
        result.stdout


def test_bench_gpu_path_runs_with_a_stand_in_device(tmp_path, monkeypatch):
    """run_gpu executes end to end with a stand-in for cupy (NumPy arrays, perf_counter events),
    so a slip in the GPU-only code cannot waste a device session."""
    import importlib.util
    import sys
    import time
    import types

    import numpy

    spec = importlib.util.spec_from_file_location('bench', os.path.join(ROOT, 'scripts', 'bench.py'))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    class Event:
        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

    runtime = types.SimpleNamespace(
        cudaDevAttrMemoryClockRate=1, cudaDevAttrGlobalMemoryBusWidth=2,
        deviceGetAttribute=lambda attr, dev: {1: 2619000, 2: 5120}[attr],
        getDeviceProperties=lambda dev: {'name': b'Stand-in GPU'}, deviceSynchronize=lambda: None)
    cuda = types.SimpleNamespace(Event=Event, runtime=runtime,
                                 get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3)

    class FakeCupy(types.ModuleType):
        def __getattr__(self, name):
            return getattr(numpy, name)

    class RandomState:  # cupy's signature: standard_normal and randint take a dtype
        def __init__(self, seed):
            self.rng = numpy.random.default_rng(seed)

        def standard_normal(self, size, dtype):
            return self.rng.standard_normal(size, dtype=dtype)

        def randint(self, low, high, size, dtype):
            return self.rng.integers(low, high, size=size, dtype=dtype)

    fake = FakeCupy('cupy')
    fake.cuda = cuda
    fake.random = types.SimpleNamespace(RandomState=RandomState)
    fake.__version__ = 'stand-in'
    fake.get_default_memory_pool = lambda: types.SimpleNamespace(free_all_blocks=lambda: None, total_bytes=lambda: 0)
    monkeypatch.setitem(sys.modules, 'cupy', fake)
    monkeypatch.setattr(bench, 'GPU_QUICK', [('64x200', (64, 200), -1), ('8x300x4', (8, 300, 4), 1),
                                             ('4x100001', (4, 100001), -1)])
    rows = []
    args = types.SimpleNamespace(quick=True, repeat=1)
    assert bench.run_gpu(args, rows) == []  # every case matches the float64 reference
    feature_rows = [r for r in rows if 'feature_cost' in r]
    assert [r['op'] for r in feature_rows] == ['fwd+bwd mean, ' + name for name, _ in bench.FEATURE_SETS]
    rows = [r for r in rows if 'feature_cost' not in r]
    assert len(rows) == 5 * 5  # the wide case runs in float32, float16 and bfloat16
    assert sum(r['case'] == '4x100001 bfloat16' for r in rows) == 5
    assert all(0 < r['peak_fraction'] and 0 < r['copy_fraction'] for r in rows)
    assert {'cupy naive'} <= set(rows[0]['ratios'])
    assert abs(bench.peak_bandwidth_gbs() - 3352.3) < 1  # H100 SXM: 2 * 2.619 GHz * 5120 bits / 8
    # the fused linear + cross entropy's GPU rows (float16 and float32), at a small stand-in shape
    monkeypatch.setattr(bench, 'LINEAR_GPU_QUICK', (64, 16, 300))
    linear_rows = []
    bench.run_linear_gpu(args, linear_rows)
    assert [r['case'] for r in linear_rows] == ['64x16x300 float16', '64x16x300 float32']
    assert all('unfused' in r['ratios'] for r in linear_rows)
    bench.write_outputs(rows, str(tmp_path))
    assert (tmp_path / 'bench.csv').exists()

    # the correctness check can fail: a gradient off by 0.1% is reported, and main() would exit 1
    right = bench.cupy_sce.forward_backward
    monkeypatch.setattr(bench.cupy_sce, 'forward_backward',
                        lambda *a, **k: (lambda r: (r[0], r[1] * 1.001))(right(*a, **k)))
    monkeypatch.setattr(bench, 'GPU_QUICK', [('64x200', (64, 200), -1)])
    assert bench.run_gpu(args, []) == ['64x200 float32']


def test_device_check_script_parses():
    result = subprocess.run(['bash', '-n', os.path.join(ROOT, 'scripts', 'device_check.sh')],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_precompile_covers_every_module_and_every_tune_variant(monkeypatch):
    """scripts/precompile.py's list: every module of every dtype with the backend's options, and
    the forward / forward+backward modules with each tune_gpu.py option set (what a GPU session
    then finds in CuPy's cache instead of compiling one module at a time)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, 'scripts'))
    import precompile
    import tune_gpu
    from cupy_sce import _kernels
    jobs = precompile.jobs(knobs=True)
    plain = {(dtype, names) for dtype, options, names in jobs if not options}
    assert plain == {(dtype, tuple(names)) for dtype in precompile.DTYPES
                     for names in _kernels.modules(dtype).values()}
    option_sets = {options for _, options, _ in tune_gpu.VARIANTS if options}
    assert {options for _, options, _ in jobs if options} == option_sets
    for dtype in precompile.KNOB_DTYPES:
        for options in option_sets:
            compiled = {name for d, o, names in jobs if (d, o) == (dtype, options) for name in names}
            assert _kernels.rows_name(dtype, 'long long', 'forward_backward', 0, 1) in compiled
            assert _kernels.rows_name(dtype, 'int', 'forward', 0, 1) in compiled
    assert len(precompile.jobs(knobs=False)) == len(plain)


@pytest.mark.skipif(harness.unavailable_reason() is not None, reason='host harness unavailable')
def test_tune_gpu_runs_its_variants_on_the_harness(tmp_path, monkeypatch):
    """scripts/tune_gpu.py end to end with the kernels on the host harness and a stand-in for
    cupy's device queries: every variant runs, compiled with its own -D options, agrees with the
    default, and gets a line."""
    import importlib.util
    import types

    import numpy

    monkeypatch.syspath_prepend(os.path.join(ROOT, 'scripts'))
    spec = importlib.util.spec_from_file_location('tune_gpu', os.path.join(ROOT, 'scripts', 'tune_gpu.py'))
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    bench = tune.bench

    built = []

    from helpers import tuned_kernels
    # a knob's library: only the kernels its variant launches here, for CI's time; the default's
    # has every float32 kernel
    timed = tuned_kernels(numpy.float32)

    class HarnessVariant(harness.HarnessRuntime):
        def __init__(self, options):  # float32 only: the cases below are float32
            super().__init__(options, dtypes=[numpy.float32], names=timed if options else None)
            built.append(self)

    import cupy as real_cupy
    fake = types.ModuleType('cupy')
    fake.__file__ = real_cupy.__file__
    device = types.SimpleNamespace(getDeviceProperties=lambda d: {'name': b'x'}, getDeviceCount=lambda: 1)
    fake.cuda = types.SimpleNamespace(runtime=device)
    monkeypatch.setitem(sys.modules, 'cupy', fake)
    monkeypatch.setattr(tune, 'VariantRuntime', HarnessVariant)
    # 13000 float32 classes: a row too long for the 48 KiB row cache (the cluster variants' case)
    monkeypatch.setattr(tune, 'CASES', [('2x13000', (2, 13000), -1, numpy.float32),
                                        ('2x100x40 axis=1', (2, 100, 40), 1, numpy.float32)])
    monkeypatch.setattr(bench, 'peak_bandwidth_gbs', lambda: 1000.0)
    monkeypatch.setattr(bench, 'time_gpu', bench.time_cpu)
    monkeypatch.setattr(bench, 'free_device_memory', lambda: None)
    draw = bench.make_inputs  # NumPy arrays stand in for device arrays
    monkeypatch.setattr(bench, 'make_inputs', lambda xp, shape, axis, dtype: draw(numpy, shape, axis, dtype))
    assert tune.main(['--repeat', '1', '--rounds', '1', '--out', str(tmp_path)]) == 0
    lines = (tmp_path / 'tune_gpu.txt').read_text().splitlines()
    assert len(lines) == 2 * len(tune.VARIANTS) and all('forward+backward' in line for line in lines)
    # each knob got a library of its own; variants without options share the default's
    libraries = {runtime.options: frozenset(lib._name for lib in runtime.libs.values()) for runtime in built}
    assert all(libraries.values())
    assert len(set(libraries.values())) == len({options for _, options, _ in tune.VARIANTS})
