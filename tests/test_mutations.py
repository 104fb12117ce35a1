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
         'tests/test_semantics.py']

_PASS2_GUARD = ('if (j {} seg_end) continue;\n'
                '                sce::Vec<T, VEC> sm, gr;')
# name: (file, original text, mutated text, occurrence to replace (0 = first), needs ASan to show)
MUTANTS = {
    'label gather off by one': (
        'sce.cu', 'state.picked = sce::to_acc(x[base + lab * inner]);',
        'state.picked = sce::to_acc(x[base + (lab + 1) * inner]);', 0, False),
    'missing __syncthreads before reading warp partials': (
        'sce_common.cuh', '        __syncthreads();\n        // every warp reduces',
        '        // every warp reduces', 0, False),
    'missing __syncthreads before reusing warp partials': (
        'sce_common.cuh', '        __syncthreads();  // warp_partials is reused by the next reduction\n',
        '', 0, False),
    'wrong stride in pass 1': (
        'sce.cu', 'dst[u] = sce::load_vec<T, VEC>(x_row + j * vec_stride);',
        'dst[u] = sce::load_vec<T, VEC>(x_row + j * VEC);', 0, False),
    'wrong stride in the row base': (
        'sce_common.cuh', 'return (row / inner) * K * inner + row % inner;',
        'return (row / inner) * K + row % inner;', 0, False),
    'reduction over too few lanes': (
        'sce_common.cuh', 'for (int lane_mask = width / 2;', 'for (int lane_mask = width / 4;', 0, False),
    'warp partials from too few warps': (
        'sce_common.cuh', 'const int n_warps = group_size / 32;', 'const int n_warps = group_size / 64;',
        0, False),
    'label range check off by one': (
        'sce_common.cuh', '(label < 0 || label >= K)', '(label < 0 || label > K)', 0, False),
    'ignored rows not zeroed': (
        'sce.cu', 'grad = zero;  // selected, not multiplied', 'grad = prob * g;  // ', 0, False),
    '32-bit offsets': (
        'sce_common.cuh', 'return (row / inner) * K * inner + row % inner;',
        'return (int)((row / inner) * K * inner + row % inner);', 0, False),
    'inactive threads leave before the shuffles': (
        'sce.cu', '    const long long n_vec = K / VEC;',
        '    if (!active) return;\n    const long long n_vec = K / VEC;', 0, False),
    'cluster merge skips the last CTA': (
        'sce_common.cuh', 'for (unsigned c = 1; c < CLUSTER; ++c)',
        'for (unsigned c = 1; c + 1 < CLUSTER; ++c)', 0, False),
    'cluster segment cached at the row offset': (
        'sce.cu', 'row_cache[j - seg_begin] = v[u];', 'row_cache[j] = v[u];', 0, True),
    'row cache slot of the wrong group': (
        'sce.cu', '+ (threadIdx.x / group_size) * seg_chunks', '+ (threadIdx.x / group_size)', 0, False),
    'pass 2 runs one vector past the row (ASan)': (
        'sce.cu', _PASS2_GUARD.format('>='), _PASS2_GUARD.format('>'), 0, True),
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


def run_probe(kernel_dir=None, asan=False, timeout=600, log_dir=None):
    env = harness.asan_env(log_dir=log_dir) if asan else dict(os.environ)
    if kernel_dir:
        env['CUPY_SCE_HARNESS_KERNEL_DIR'] = kernel_dir
    env.pop('PYTEST_ADDOPTS', None)
    cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', '-k', 'harness or not numpy',
           '--hypothesis-seed=0'] + PROBE
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_probe_passes_on_the_real_kernels():
    result = run_probe()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert ' passed' in result.stdout


def _with_asan_logs(result, log_dir):
    logs = ''.join(open(os.path.join(log_dir, f)).read() for f in sorted(os.listdir(log_dir)))
    return result.stdout + result.stderr + logs


def test_probe_passes_under_address_sanitizer(tmp_path):
    """Every kernel (the probe launches all instantiations) with ASan: no out-of-bounds access."""
    result = run_probe(asan=True, log_dir=str(tmp_path))
    output = _with_asan_logs(result, str(tmp_path))
    assert 'AddressSanitizer' not in output, output[-6000:]
    assert result.returncode == 0, output[-6000:]


@pytest.mark.parametrize('name', sorted(MUTANTS))
def test_mutant_is_caught(tmp_path, name):
    file, original, mutated, occurrence, asan = MUTANTS[name]
    kernel_dir = mutate(tmp_path, file, original, mutated, occurrence)
    log_dir = tmp_path / 'asan'
    log_dir.mkdir()
    result = run_probe(kernel_dir, asan=asan, log_dir=str(log_dir))
    output = _with_asan_logs(result, str(log_dir))
    assert result.returncode != 0, 'mutant "{}" survived:\n{}'.format(name, output[-3000:])
    assert 'harness build failed' not in output, 'the mutant does not compile:\n' + output[-3000:]
    if asan:  # past a NumPy buffer (heap) or past the launch's dynamic shared memory (poisoned)
        assert 'AddressSanitizer' in output, output[-3000:]
        assert 'heap-buffer-overflow' in output or 'use-after-poison' in output, output[-3000:]
