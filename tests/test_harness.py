"""The host harness itself: CUDA built-ins on fibers, and the misuse it must report."""
import os

import numpy
import pytest

from cupy_sce.testing import harness

HERE = os.path.dirname(os.path.abspath(__file__))
SELFTEST = ['selftest_shuffles', 'selftest_block_sum<true>', 'selftest_block_sum<false>',
            'selftest_dynamic_reverse', 'selftest_dynamic_overrun', 'selftest_ids', 'selftest_half',
            'selftest_divergent_barrier', 'selftest_exited_lane_shuffle', 'selftest_lane_outside_mask',
            'selftest_cluster_ring<true>', 'selftest_cluster_ring<false>',
            'selftest_cluster_divergent_barrier']

pytestmark = pytest.mark.skipif(harness.unavailable_reason() is not None,
                                reason='host harness unavailable: {}'.format(harness.unavailable_reason()))


@pytest.fixture(scope='module')
def selftest():
    lib = harness.load(harness.build(kernel_dir=os.path.join(HERE, 'kernels'),
                                     source='harness_selftest.cu', names=SELFTEST))

    def launch(name, grid, block, args, **kw):
        harness.launch(name, grid, block, args, lib=lib, **kw)
    return launch


def test_shuffles(selftest):
    out = numpy.full(64 * 5, -7, numpy.int32)
    out_double = numpy.zeros(64)
    selftest('selftest_shuffles', 1, 64, (out, out_double))
    out = out.reshape(64, 5)
    lane = numpy.arange(64) % 32
    numpy.testing.assert_array_equal(out[:, 0], lane ^ 1)
    down = numpy.where(lane % 8 == 7, lane, lane + 1)  # the last lane of each 8-wide segment keeps its own
    numpy.testing.assert_array_equal(out[:, 1], down)
    numpy.testing.assert_array_equal(out[:, 2], numpy.where(lane < 2, lane, lane - 2))
    numpy.testing.assert_array_equal(out[:, 3], numpy.full(64, 30))
    partial = numpy.where(lane < 12, lane + 104, lane + 100)  # lanes 12..15: source outside the width
    numpy.testing.assert_array_equal(out[:, 4], numpy.where(lane < 16, partial, -1))
    numpy.testing.assert_array_equal(out_double, 0.5 + (lane ^ 16))


def test_block_reduction_barriers_and_atomics(selftest):
    x = numpy.random.default_rng(0).random(4 * 256).astype(numpy.float32)
    out = numpy.zeros(4, numpy.float32)
    counter = numpy.zeros(1, numpy.int32)
    selftest('selftest_block_sum<true>', 4, 256, (x, out, counter))
    numpy.testing.assert_allclose(out, x.reshape(4, 256).sum(1), rtol=1e-5)
    assert counter[0] == 1024


def test_missing_barrier_gives_wrong_results(selftest):
    """The scheduler interleaves threads like a GPU: a forgotten barrier is visible."""
    x = numpy.random.default_rng(1).random(4 * 256).astype(numpy.float32)
    out = numpy.zeros(4, numpy.float32)
    selftest('selftest_block_sum<false>', 4, 256, (x, out, numpy.zeros(1, numpy.int32)))
    assert not numpy.allclose(out, x.reshape(4, 256).sum(1), rtol=1e-5)


def test_dynamic_shared_memory(selftest):
    x = numpy.arange(3 * 128, dtype=numpy.float64)
    out = numpy.zeros_like(x)
    selftest('selftest_dynamic_reverse', 3, 128, (x, out), shared_mem=128 * 8)
    numpy.testing.assert_array_equal(out.reshape(3, 128), x.reshape(3, 128)[:, ::-1])


def test_dynamic_shared_memory_starts_as_nan(selftest):
    out = numpy.zeros(64)
    selftest('selftest_dynamic_overrun', 1, 64, (out,), shared_mem=65 * 8)
    numpy.testing.assert_array_equal(out[:63], numpy.arange(1, 64))
    assert numpy.isnan(out[63])  # one past what the block wrote: never written, reads NaN


def test_thread_and_block_ids_3d(selftest):
    out = numpy.full(2 * 3 * 16, -1, numpy.int32)
    selftest('selftest_ids', (2, 3), (4, 2, 2), (out,))
    expected = [b * 1000 + t for b in range(6) for t in range(16)]
    numpy.testing.assert_array_equal(out, expected)


def test_half(selftest):
    x = numpy.array([1.5, -2.0, 65504.0, 0.1], numpy.float16)
    out = numpy.zeros(4, numpy.float16)
    selftest('selftest_half', 1, 4, (x, out, numpy.float32(0.5)))
    numpy.testing.assert_array_equal(out, (x.astype(numpy.float32) * 0.5).astype(numpy.float16))


@pytest.mark.parametrize('name,block,message', [
    ('selftest_divergent_barrier', 32, 'deadlock|__syncthreads reached after'),
    ('selftest_exited_lane_shuffle', 32, 'deadlock'),
    ('selftest_lane_outside_mask', 32, 'calling lane is not in the mask'),
])
def test_misuse_is_reported(selftest, name, block, message):
    out = numpy.zeros(block, numpy.int32)
    with pytest.raises(harness.HarnessError, match=message):
        selftest(name, 1, block, (out,))


def test_launch_checks(selftest):
    out = numpy.zeros(64, numpy.int32)
    with pytest.raises(harness.HarnessError, match='argument 0 is 4 bytes'):
        selftest('selftest_ids', 1, 4, (numpy.int32(0),))
    with pytest.raises(harness.HarnessError, match='takes 1 arguments, got 2'):
        selftest('selftest_ids', 1, 4, (out, out))
    with pytest.raises(harness.HarnessError, match='1025 threads'):
        selftest('selftest_ids', 1, 1025, (out,))
    with pytest.raises(harness.HarnessError, match='48 KiB'):
        selftest('selftest_dynamic_reverse', 1, 4, (out, out), shared_mem=48 * 1024 + 16)
    with pytest.raises(harness.HarnessError, match='non-contiguous'):
        selftest('selftest_ids', 1, 4, (out[::2],))
    with pytest.raises(harness.HarnessError, match='not a NumPy array or scalar'):
        selftest('selftest_ids', 1, 4, (7,))
    with pytest.raises(harness.HarnessError, match='no such kernel'):
        selftest('selftest_nothing', 1, 4, (out,))


def test_registry_is_the_backends_instantiation_list():
    assert harness.kernel_names() == harness.library_names(0)


def test_asan_build_matches_environment():
    """The ASan probe (test_mutations) must really run the AddressSanitizer build."""
    assert harness.is_asan() == (os.environ.get('CUPY_SCE_HARNESS_ASAN') == '1')


@pytest.mark.parametrize('cluster', [1, 2, 4, 8])
def test_cluster_blocks_read_each_others_shared_memory(selftest, cluster):
    out = numpy.zeros(8 * 64, numpy.float32)
    selftest('selftest_cluster_ring<true>', 8, 64, (numpy.int32(cluster), out), shared_mem=16,
             cluster=cluster)
    block = numpy.arange(8)
    neighbour = block - block % cluster + (block % cluster + 1) % cluster
    numpy.testing.assert_array_equal(out.reshape(8, 64), numpy.repeat(neighbour, 64).reshape(8, 64))


def test_missing_cluster_barrier_reads_unwritten_shared_memory(selftest):
    """Blocks of a cluster run interleaved: without the barrier some thread reads a neighbour's
    shared memory before the neighbour wrote it (the harness fills it with NaN bytes)."""
    results = []
    for seed in range(4):
        out = numpy.zeros(8 * 64, numpy.float32)
        selftest('selftest_cluster_ring<false>', 8, 64, (numpy.int32(4), out), shared_mem=16, cluster=4,
                 seed=seed)
        results.append(numpy.isnan(out).any())
    assert any(results)


def test_cluster_barrier_after_an_exit_is_reported(selftest):
    with pytest.raises(harness.HarnessError, match='cluster barrier reached after 1 thread'):
        selftest('selftest_cluster_divergent_barrier', 4, 32, (numpy.zeros(1, numpy.int32),), cluster=2)


def test_cluster_and_shared_memory_launch_checks(selftest):
    out = numpy.zeros(6 * 32, numpy.float32)
    with pytest.raises(harness.HarnessError, match='cluster of 4 blocks for a grid of 6'):
        selftest('selftest_cluster_ring<true>', 6, 32, (numpy.int32(4), out), shared_mem=16, cluster=4)
    with pytest.raises(harness.HarnessError, match='cluster of 16 blocks'):
        selftest('selftest_cluster_ring<true>', 16, 32,
                 (numpy.int32(16), numpy.zeros(16 * 32, numpy.float32)),
                 shared_mem=16, cluster=16)
    big = 100 * 1024
    with pytest.raises(harness.HarnessError, match='but the kernel allows 49152'):
        selftest('selftest_cluster_ring<true>', 2, 32, (numpy.int32(2), out), shared_mem=big, cluster=2)
    selftest('selftest_cluster_ring<true>', 2, 32, (numpy.int32(2), out), shared_mem=big, cluster=2,
             max_shared=big)  # with the opt-in
    with pytest.raises(harness.HarnessError, match='above the device'):
        selftest('selftest_cluster_ring<true>', 2, 32, (numpy.int32(2), out), shared_mem=big, cluster=2,
                 max_shared=300 * 1024)
