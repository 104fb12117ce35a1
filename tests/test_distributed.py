"""cupy_sce.distributed (vocabulary-parallel cross entropy) on real communicators: mpi4py with the
MPICH wheels under ``mpiexec`` (1 to 4 ranks) and a torch.distributed gloo group (2 ranks), every
rank a process the test starts (tests/programs/vocab_parallel.py), against the single-array
functions; argument checks and bfloat16 in this process on ``MPI.COMM_SELF``.  The NCCL
communicator runs on a GPU only."""
import os
import shutil
import socket
import subprocess
import sys

import numpy
import pytest

import cupy_sce
from cupy_sce import distributed
from helpers import BFLOAT16, gpu_available

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAM = os.path.join(HERE, 'programs', 'vocab_parallel.py')
ROOT = os.path.dirname(HERE)


def _mpiexec():
    found = shutil.which('mpiexec', path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))
    if found is None:
        pytest.fail('mpiexec not found: the test extra installs the mpich wheel, which provides it')
    return found


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    env['CUPY_SCE_NUM_THREADS'] = '1'  # several ranks share the cores
    return env


@pytest.mark.parametrize('ranks', [1, 2, 3, 4])
def test_mpi_ranks_match_one_array(ranks):
    result = subprocess.run([_mpiexec(), '-n', str(ranks), sys.executable, PROGRAM, 'mpi'], capture_output=True,
                            text=True, timeout=300, env=_env(), cwd=ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert 'ok 146 cases on {} ranks'.format(ranks) in result.stdout, result.stdout[-2000:]


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_torch_distributed_gloo_group_matches_one_array():
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(_env(), RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, PROGRAM, 'torch'], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300))
    finally:
        for proc in procs:
            proc.kill()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, (out + err)[-4000:]
    assert 'ok 146 cases on 2 ranks' in outputs[0][0]


# ---------------------------------------------------------------- one process (MPI.COMM_SELF)

@pytest.fixture(scope='module')
def comm():
    from mpi4py import MPI
    return MPI.COMM_SELF


def test_one_rank_is_the_single_array_call_and_inputs_stay(comm):
    rng = numpy.random.default_rng(3)
    x = rng.standard_normal((6, 11)).astype(numpy.float32)
    label = numpy.array([[0], [10], [-100], [3], [3], [7]])
    weight = rng.uniform(0.5, 2, 11).astype(numpy.float32)
    before = x.copy(), label.copy(), weight.copy()
    kw = dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, reduction='mean')
    loss, grad = distributed.vocab_parallel_forward_backward(x, label, 0, comm, **kw)
    want_loss, want_grad = cupy_sce.forward_backward(x, label, **kw)
    numpy.testing.assert_allclose(loss, want_loss, rtol=2e-6)
    numpy.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=1e-7)
    for a, b in zip((x, label, weight), before):
        numpy.testing.assert_array_equal(a, b)
    # an ignored row of NaN logits under a soft cap: gradient 0 (the slope is applied before the masks)
    nan_row = numpy.array([[numpy.nan, 1.0, 2.0], [0.0, 1.0, 2.0]])
    grad = distributed.vocab_parallel_forward_backward(nan_row, numpy.array([-100, 0]), 0, comm, softcap=5.0)[1]
    numpy.testing.assert_array_equal(grad[0], 0)


def test_bfloat16_shards(comm):
    """bfloat16 local logits: computed in float32, loss and gradient in bfloat16, within a bfloat16
    rounding of the float32 results from the same values."""
    rng = numpy.random.default_rng(4)
    x = rng.standard_normal((5, 9)).astype(BFLOAT16)
    label = rng.integers(0, 9, 5)
    loss, grad = distributed.vocab_parallel_forward_backward(x, label, 0, comm, reduction='sum')
    assert loss.dtype == grad.dtype == BFLOAT16
    want_loss, want_grad = cupy_sce.forward_backward(x.astype(numpy.float32), label, reduction='sum')
    numpy.testing.assert_allclose(loss.astype(numpy.float32), want_loss, rtol=8e-3)
    numpy.testing.assert_allclose(grad.astype(numpy.float32), want_grad, rtol=8e-3, atol=1e-6)
    with pytest.raises(TypeError, match='local_logits is bfloat16 but weight is float64'):
        distributed.vocab_parallel_forward(x, label, 0, comm, weight=numpy.ones(9))


def test_bad_arguments_name_the_argument(comm):
    x = numpy.zeros((3, 4), numpy.float32)
    label = numpy.zeros(3, numpy.int64)
    f = distributed.vocab_parallel_forward
    cases = [
        (TypeError, 'comm must be an mpi4py communicator', lambda: f(x, label, 0, object())),
        (ValueError, 'vocab_start must be >= 0, got -1', lambda: f(x, label, -1, comm)),
        (TypeError, 'vocab_start must be an int', lambda: f(x, label, 1.5, comm)),
        (TypeError, 'local_logits must be float16, bfloat16, float32 or float64', lambda: f(label, label, 0, comm)),
        (ValueError, "weight must be this rank's slice", lambda: f(x, label, 0, comm, weight=numpy.ones(8))),
        (TypeError, 'label must be an integer array', lambda: f(x, x[:, :1], 0, comm)),
        (ValueError, 'label shape', lambda: f(x, numpy.zeros(4, numpy.int64), 0, comm)),
        (ValueError, 'label shape .* must equal local_logits shape', lambda: f(x, x[:, :2], 0, comm, soft_label=True)),
        (ValueError, "reduction must be 'none', 'mean' or 'sum'", lambda: f(x, label, 0, comm, reduction='avg')),
        (ValueError, 'label_smoothing must be in', lambda: f(x, label, 0, comm, label_smoothing=1.0)),
        (IndexError, r'label value 4 at position \(1,\) is out of range for V=4',
         lambda: f(x, numpy.array([0, 4, 1]), 0, comm)),
        (ValueError, 'loss_grad must be a scalar', lambda: distributed.vocab_parallel_forward_backward(
            x, label, 0, comm, numpy.ones(3), reduction='mean')),
        (TypeError, 'loss_grad must be a real number, got dtype bool',
         lambda: distributed.vocab_parallel_forward_backward(x, label, 0, comm, True, reduction='mean')),
        (TypeError, 'local_logits is bfloat16 but loss_grad is float64', lambda: distributed.vocab_parallel_forward_backward(
            x.astype(BFLOAT16), label, 0, comm, numpy.ones((3, 1)))),
        (TypeError, 'local_logits is bfloat16 but lse is float64', lambda: distributed.vocab_parallel_backward(
            None, x.astype(BFLOAT16), numpy.zeros(3), label, 0, comm)),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc, match=message):
            call()


@pytest.mark.gpu
def test_nccl_communicator_of_one_gpu():
    """cupyx.distributed's NCCL communicator (a group of one: the code path, not the scaling)."""
    if not gpu_available():
        pytest.skip('no CUDA GPU present: the NCCL communicator needs one')
    import cupy
    from cupyx import distributed as cupyx_distributed
    nccl = cupyx_distributed.init_process_group(1, 0, port=_free_port())
    rng = numpy.random.default_rng(5)
    x = rng.standard_normal((7, 33)).astype(numpy.float32)
    label = rng.integers(0, 33, 7)
    loss, grad = distributed.vocab_parallel_forward_backward(cupy.asarray(x), cupy.asarray(label), 0, nccl,
                                                             label_smoothing=0.1)
    want_loss, want_grad = cupy_sce.forward_backward(x, label, label_smoothing=0.1)
    numpy.testing.assert_allclose(cupy.asnumpy(loss), want_loss, rtol=2e-6)
    numpy.testing.assert_allclose(cupy.asnumpy(grad), want_grad, rtol=2e-5, atol=1e-7)
