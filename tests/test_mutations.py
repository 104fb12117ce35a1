"""Proof that the CPU execution of the kernels bites, and the AddressSanitizer run.

Each mutant is the kernel source with one deliberate bug.  It is built into
its own harness library and the probe -- the harness half of the test suite,
in a subprocess, so a crash is a failure and not the end of this run -- must
fail.  The unmutated kernels must pass the same probe, with and without
AddressSanitizer (the ASan run of CI).
"""
import os
import shutil
import subprocess
import sys

import pytest

from cupy_sce import _kernels
from cupy_sce.testing import harness

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

pytestmark = pytest.mark.skipif(harness.unavailable_reason() is not None,
                                reason='host harness unavailable: {}'.format(harness.unavailable_reason()))

PROBE = ['tests/test_harness.py::test_asan_build_matches_environment',
         'tests/test_kernels.py::test_every_instantiation_runs_and_matches',
         'tests/test_kernels.py::test_cluster_instantiations_run_and_match',
         'tests/test_kernels.py::test_64bit_offsets_on_huge_sparse_buffers',
         'tests/test_kernels.py::test_in_place_every_group_size',
         # one case each: a NaN in every lane and warp of a 256-thread row; a confident float32 loss
         'tests/test_contract.py::test_row_max_keeps_a_nan_from_any_lane[harness-float32-8192]',
         'tests/test_contract.py::test_a_confident_prediction_keeps_its_digits[harness-float32]',
         'tests/test_semantics.py']

# the 16-bit rounding mutants' probe: exact bits of a few float16 and bfloat16 gradients
ROUNDING_PROBE = ['tests/test_kernels.py::test_16_bit_gradient_is_rounded_once']
# the feature mutants' probe: every feature at once, one harness library to build
FEATURE_PROBE = ['tests/test_kernels.py::test_all_features_together']
# The ASan run: the probe and all features at once (the variant with every feature makes every
# feature's memory accesses -- the class weights, their sum, the soft labels' weighted sum; one
# with fewer features makes a subset), in two halves on two cores.
ASAN_PROBES = (['tests/test_semantics.py'], [t for t in PROBE if t != 'tests/test_semantics.py'] + FEATURE_PROBE)

_PASS2_GUARD = ('if (j {} at.seg_end) continue;\n'
                '            Vec<T, VEC> sm, gr;')
# name: (file, original text, mutated text, occurrence to replace (0 = first), needs ASan to show, probe)
MUTANTS = {
    'label gather off by one': (
        'sce.cu', 'state.picked = capped<P::softcap>(to_acc(x[at.base + lab * inner]), softcap);',
        'state.picked = capped<P::softcap>(to_acc(x[at.base + (lab + 1) * inner]), softcap);', 0, False, PROBE),
    'missing __syncthreads before reading warp partials': (
        'sce_common.cuh', '        __syncthreads();\n        // every warp reduces',
        '        // every warp reduces', 0, False, PROBE),
    'missing __syncthreads before reusing warp partials': (
        'sce_common.cuh', '        __syncthreads();  // warp_partials is reused by the next reduction\n',
        '', 0, False, PROBE),
    'wrong stride in pass 1': (
        'sce.cu', ': load_vec<T, VEC>(x_row + j * vec_stride);',
        ': load_vec<T, VEC>(x_row + j * VEC);', 0, False, PROBE),
    'wrong stride in the row base': (
        'sce_common.cuh', 'return (row / inner) * K * inner + row % inner;',
        'return (row / inner) * K + row % inner;', 0, False, PROBE),
    'reduction over too few lanes': (
        'sce_common.cuh', 'for (int lane_mask = width / 2;', 'for (int lane_mask = width / 4;', 0, False, PROBE),
    'warp partials from too few warps': (
        'sce_common.cuh', 'const int n_warps = group_size / 32;', 'const int n_warps = group_size / 64;',
        0, False, PROBE),
    'label range check off by one': (
        'sce_common.cuh', '(label < 0 || label >= K)', '(label < 0 || label > K)', 0, False, PROBE),
    'ignored rows not zeroed': (
        'sce.cu', 'grad = zero;  // selected, not multiplied', 'grad = prob * t.grad_scale;  // ', 0, False, PROBE),
    '32-bit offsets': (
        'sce_common.cuh', 'return (row / inner) * K * inner + row % inner;',
        'return (int)((row / inner) * K * inner + row % inner);', 0, False, PROBE),
    'inactive threads leave before the shuffles': (
        'sce.cu', '    // step 1: the label\n',
        '    if (!at.active) return;\n', 0, False, PROBE),
    'cluster merge skips the last CTA': (
        'sce_common.cuh', 'for (unsigned c = 1; c < CLUSTER; ++c)',
        'for (unsigned c = 1; c + 1 < CLUSTER; ++c)', 0, False, PROBE),
    'cluster segment cached at the row offset': (
        'sce.cu', 'row_cache[j - at.seg_begin] = v[u];', 'row_cache[j] = v[u];', 0, True, PROBE),
    'row cache slot of the wrong group': (
        'sce.cu', '(threadIdx.x / group_size) * at.seg_chunks', '(threadIdx.x / group_size)', 0, False, PROBE),
    'pass 2 runs one vector past the row (ASan)': (
        'sce.cu', _PASS2_GUARD.format('>='), _PASS2_GUARD.format('>'), 0, True, PROBE),
    # the contract (issue 11)
    'row max merge drops a NaN from one side': (
        'sce_common.cuh', 'const { return nan_max(a, b); }', 'const { return a > b ? a : b; }', 0, False, PROBE),
    'confident loss from log(sum)': (
        'sce.cu', 'r.label_ce = label_rel >= r.log_sum_exp - exp_headroom(A())',
        'r.label_ce = false', 0, False, PROBE),
    # the loss family (issue 10)
    'class weight index off by one': (
        'sce.cu', 'r.weight = r.one_minus_eps * weight[lab] + mean_part;',
        'r.weight = r.one_minus_eps * weight[lab > 0 ? lab - 1 : lab + 1] + mean_part;', 0, False, FEATURE_PROBE),
    'smoothing term dropped from the gradient': (
        'sce.cu', 'target = (k == lab ? t.one_minus_eps : zero) + t.eps_over_k;',
        'target = (k == lab ? t.one_minus_eps : zero);', 0, False, FEATURE_PROBE),
    'z-loss factor 2 missing': (
        'sce.cu', 'target_sum + A(2) * z_loss *', 'target_sum + z_loss *', 0, False, FEATURE_PROBE),
    'softcap derivative missing': (
        'sce.cu', 'if (P::softcap) grad *= cap_slope<true>(to_acc(v[u].v[e]), softcap);', '', 0, False,
        FEATURE_PROBE),
    'soft-label weight ignores the label': (
        'sce.cu', 'state.label_weight += lk * weight[j * VEC + e];',
        'state.label_weight += weight[j * VEC + e];', 0, False, FEATURE_PROBE),
    'bfloat16 rounded toward zero': (
        'sce_common.cuh', 'return __float2bfloat16_rn(v);', 'return __float2bfloat16_rz(v);', 0, False,
        ROUNDING_PROBE),
    "label's softmax - 1 from the softmax": (
        'sce.cu', 'return expm1_acc(log_prob) * t.prob_scale', 'return (exp_acc(log_prob) - A(1)) * t.prob_scale',
        0, False, ROUNDING_PROBE),
}


def mutate(tmp_path, file, original, mutated, occurrence):
    kernel_dir = tmp_path / 'kernels'
    shutil.copytree(_kernels.KERNEL_DIR, kernel_dir)
    path = kernel_dir / file
    text = path.read_text()
    parts = text.split(original)
    assert len(parts) > occurrence + 1, 'mutation anchor not found: {!r}'.format(original)
    text = original.join(parts[:occurrence + 1]) + mutated + original.join(parts[occurrence + 1:])
    path.write_text(text)
    return str(kernel_dir)


# The dtypes each probe launches: a mutant's library holds only those, built at -O0 (a library per
# mutant, and each probe runs for seconds: -O0 compiles about 3x faster and costs less than it
# saves).  The ASan run builds every dtype.
PROBE_DTYPES = {tuple(PROBE): 'float16,float32,float64', tuple(FEATURE_PROBE): 'float32,float64',
                tuple(ROUNDING_PROBE): 'float16,bfloat16'}


def run_probe(kernel_dir=None, asan=False, timeout=900, log_dir=None, probe=PROBE):
    env = harness.asan_env(log_dir=log_dir) if asan else dict(os.environ)
    if kernel_dir:
        env['CUPY_SCE_HARNESS_KERNEL_DIR'] = kernel_dir
    if not asan:
        env[harness.DTYPES_ENV] = PROBE_DTYPES[tuple(probe)]
        env[harness.OPT_ENV] = '-O0'
    env.pop('PYTEST_ADDOPTS', None)
    cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', '-k', 'harness or not (numpy or numba)',
           '--hypothesis-seed=0'] + probe
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('probe', [PROBE, FEATURE_PROBE, ROUNDING_PROBE], ids=['probe', 'feature probe', 'rounding probe'])
def test_probe_passes_on_the_real_kernels(probe):
    result = run_probe(probe=probe)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert ' passed' in result.stdout


def _with_asan_logs(result, log_dir):
    logs = ''.join(open(os.path.join(log_dir, f)).read() for f in sorted(os.listdir(log_dir)))
    return result.stdout + result.stderr + logs


def _cores():
    return max(1, len(os.sched_getaffinity(0)))


def test_probe_passes_under_address_sanitizer(tmp_path):
    """Every featureless kernel and every kernel with all features, with ASan: no out-of-bounds
    access.  The two libraries are built at once, then the probe runs in two halves at once."""
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(_cores()) as pool:
        list(pool.map(lambda key: harness.build(asan=True, names=harness.library_names(key)),
                      (0, _kernels.ALL_FEATURES)))
        logs = [tmp_path / 'half{}'.format(i) for i in range(len(ASAN_PROBES))]
        for log in logs:
            log.mkdir()
        results = list(pool.map(lambda args: run_probe(asan=True, log_dir=str(args[0]), probe=args[1]),
                                zip(logs, ASAN_PROBES)))
    for result, log in zip(results, logs):
        output = _with_asan_logs(result, str(log))
        assert 'AddressSanitizer' not in output, output[-6000:]
        assert result.returncode == 0, output[-6000:]
        assert ' passed' in result.stdout


@pytest.fixture(scope='module')
def mutant_results(tmp_path_factory):
    """Every kernel mutant's probe, {name: (return code, output)}, run as subprocesses on every
    core at once (each builds its own harness library from its mutated source)."""
    import concurrent.futures

    def run(name):
        file, original, mutated, occurrence, asan, probe = MUTANTS[name]
        tmp = tmp_path_factory.mktemp('mutant')
        kernel_dir = mutate(tmp, file, original, mutated, occurrence)
        log_dir = tmp / 'asan'
        log_dir.mkdir()
        result = run_probe(kernel_dir, asan=asan, log_dir=str(log_dir), probe=probe)
        return name, (result.returncode, _with_asan_logs(result, str(log_dir)))
    with concurrent.futures.ThreadPoolExecutor(_cores()) as pool:
        return dict(pool.map(run, sorted(MUTANTS)))


@pytest.mark.parametrize('name', sorted(MUTANTS))
def test_mutant_is_caught(mutant_results, name):
    returncode, output = mutant_results[name]
    asan = MUTANTS[name][4]
    assert returncode != 0, 'mutant "{}" survived:\n{}'.format(name, output[-3000:])
    assert 'harness build failed' not in output, 'the mutant does not compile:\n' + output[-3000:]
    if asan:  # past a NumPy buffer (heap) or past the launch's dynamic shared memory (poisoned)
        assert 'AddressSanitizer' in output, output[-3000:]
        assert 'heap-buffer-overflow' in output or 'use-after-poison' in output, output[-3000:]


# ---------------------------------------------------------------- host-side mutants

HOST_MUTANTS = {  # name: (function of cupy_sce._api, original text, mutated text)
    'mean divisor counts ignored rows': (
        '_normalizer', 'counted = p.ignored(kept=True)', 'counted = p.label == p.label'),
    'mean divisor ignores the class weights': (
        '_normalizer', '    if p.weight is None:\n        return counted.sum(dtype=acc)',
        '    if True:\n        return counted.sum(dtype=acc)'),
}


@pytest.mark.parametrize('backend_name', ['numpy', 'harness'])
@pytest.mark.parametrize('name', sorted(HOST_MUTANTS))
def test_host_mutant_is_caught(monkeypatch, name, backend_name):
    """The reductions' divisor is computed on the host, once for both backends: a mutated copy of
    it must make the reduction checks (helpers.check_features) fail."""
    import inspect
    import numpy
    from cupy_sce import _api
    from helpers import Backend, check_features
    function, original, mutated = HOST_MUTANTS[name]
    source = inspect.getsource(getattr(_api, function))
    assert source.count(original) == 1, 'mutation anchor not found: {!r}'.format(original)
    namespace = dict(vars(_api))
    exec(source.replace(original, mutated), namespace)  # noqa: S102 - the mutant, from our own source
    backend = Backend(backend_name)
    rng = numpy.random.default_rng(7)
    check_features(backend, rng, numpy.float64, (6, 5), -1, 'int64', _kernels.F_WEIGHT, 'mean')  # unmutated
    monkeypatch.setattr(_api, function, namespace[function])
    with pytest.raises(AssertionError):
        for seed in range(5):  # ignored rows come at random: several cases
            check_features(backend, numpy.random.default_rng(seed), numpy.float64, (6, 5), -1, 'int64',
                           _kernels.F_WEIGHT, 'mean')
