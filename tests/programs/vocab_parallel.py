"""The vocabulary-parallel cross entropy on real communicators, run by tests/test_distributed.py:

    mpiexec -n 3 python tests/programs/vocab_parallel.py mpi
    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/programs/vocab_parallel.py torch

Every rank builds the same random problems, keeps its slice of the classes (split unevenly, at
random, at least one class a rank) and calls cupy_sce.distributed; the loss, the lse and its
slice of the gradient must match cupy_sce's single-array functions on the whole logits.  A bad
label must raise IndexError on every rank.  Rank 0 prints ``ok <cases>``; any failure exits
non-zero (an exception on any rank ends mpiexec with an error).
"""
import itertools
import sys

import numpy

import cupy_sce
from cupy_sce import distributed

TOL = {numpy.float32: dict(rtol=3e-5, atol=3e-6), numpy.float64: dict(rtol=1e-11, atol=1e-13)}
FEATURES = [{}, {'weight': True}, {'label_smoothing': 0.2}, {'z_loss': 0.01}, {'softcap': 2.5},
            {'weight': True, 'label_smoothing': 0.1, 'z_loss': 1e-3, 'softcap': 4.0}]


class MPIWorld:
    def __init__(self):
        from mpi4py import MPI
        self.comm, self.MPI = MPI.COMM_WORLD, MPI
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def count(self, flag):
        """How many ranks have ``flag`` set."""
        return self.comm.allreduce(int(flag), op=self.MPI.SUM)


class TorchWorld:
    def __init__(self):
        import torch
        import torch.distributed as dist
        dist.init_process_group('gloo')
        self.torch, self.dist = torch, dist
        self.comm = dist.group.WORLD
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def count(self, flag):
        t = self.torch.tensor([int(flag)])
        self.dist.all_reduce(t)
        return int(t.item())

    def close(self):
        """Leave together: a rank that exits while its peer still talks to it can fail at exit."""
        self.dist.barrier()
        self.dist.destroy_process_group()


def split(rng, V, size):
    """Uneven class boundaries, at least one class a rank."""
    cuts = numpy.sort(rng.choice(numpy.arange(1, V), size - 1, replace=False))
    return numpy.concatenate([[0], cuts, [V]])


def problem(rng, shape, axis, dtype, soft):
    x = rng.standard_normal(shape) * 3
    row_shape = list(shape)
    row_shape[axis] = 1
    if soft:
        label = rng.random(shape) * (rng.random(shape) < 0.6)
        label = label / numpy.maximum(label.sum(axis, keepdims=True), 1e-3)
        return x.astype(dtype), label.astype(dtype)
    label = rng.integers(0, shape[axis], row_shape)
    label[rng.random(row_shape) < 0.2] = -100
    # a confident row: the label dominates (loss about 1e-6)
    first = tuple([0] * len(shape))
    if label[first] >= 0:
        index = list(first)
        index[axis] = label[first]
        x[tuple(index)] = 30.0
    return x.astype(dtype), label


def check_case(world, rng, shape, axis, dtype, soft, features, reduction):
    V = shape[axis]
    x, label = problem(rng, shape, axis, dtype, soft)
    kw = dict(features)
    if kw.pop('weight', False):
        kw['weight'] = (rng.integers(1, 25, V) / 8.0).astype(dtype)
    bounds = split(rng, V, world.size)
    start, stop = int(bounds[world.rank]), int(bounds[world.rank + 1])
    take = [slice(None)] * len(shape)
    take[axis] = slice(start, stop)
    take = tuple(take)
    local_x = numpy.ascontiguousarray(x[take])
    local_label = numpy.ascontiguousarray(label[take]) if soft else label
    local_kw = dict(kw)
    if 'weight' in kw:
        local_kw['weight'] = kw['weight'][start:stop]
    loss_grad = (rng.uniform(-2, 2, numpy.shape(cupy_sce.forward(x, label, soft_label=soft, axis=axis)[0]))
                 .astype(dtype) if reduction == 'none' else 1.5)
    common = dict(soft_label=soft, axis=axis, reduction=reduction)
    want_loss, want_lse = cupy_sce.forward(x, label, **common, **kw)
    _, want_grad = cupy_sce.forward_backward(x, label, loss_grad, **common, **kw)

    loss, lse = distributed.vocab_parallel_forward(local_x, local_label, start, world.comm, **common, **local_kw)
    tol = TOL[numpy.dtype(dtype).type]
    context = '{} axis={} {} soft={} {} {}'.format(shape, axis, numpy.dtype(dtype).name, soft, features, reduction)
    assert loss.dtype == want_loss.dtype and loss.shape == want_loss.shape, context
    numpy.testing.assert_allclose(loss, want_loss, err_msg='loss ' + context, **tol)
    numpy.testing.assert_allclose(lse, want_lse, err_msg='lse ' + context, **tol)
    loss2, grad = distributed.vocab_parallel_forward_backward(local_x, local_label, start, world.comm, loss_grad,
                                                              **common, **local_kw)
    numpy.testing.assert_array_equal(loss2, loss)
    assert grad.dtype == x.dtype and grad.shape == local_x.shape, context
    numpy.testing.assert_allclose(grad, want_grad[take], err_msg='grad ' + context, **tol)
    grad2 = distributed.vocab_parallel_backward(loss_grad, local_x, lse, local_label, start, world.comm, **common,
                                                **local_kw)
    numpy.testing.assert_allclose(grad2, want_grad[take], err_msg='backward ' + context, **tol)


def check_confident_prediction(world):
    """Loss 1e-8 split over the ranks: log1p of the other classes, and softmax - 1 from expm1."""
    V = 4 * world.size
    x = numpy.full((1, V), -21.0)
    x[0, 0] = 0.0
    x[0, 1:4] = [-18.0, -19.0, -20.0]
    label = numpy.array([0])
    per = V // world.size
    start = world.rank * per
    loss, grad = distributed.vocab_parallel_forward_backward(x[:, start:start + per].astype(numpy.float32), label,
                                                             start, world.comm)
    exact = numpy.log1p(numpy.exp(x[0, 1:]).sum())
    assert abs(loss[0, 0] - exact) <= 4e-7 * exact, (loss, exact)
    if world.rank == 0:
        assert abs(grad[0, 0] + exact) <= 4e-7 * exact, (grad[0, 0], -exact)  # -softmax sum of the others


def check_bad_label(world):
    """A label outside [0, V): IndexError on every rank (none waits in a collective); unchecked, NaN."""
    x = numpy.random.default_rng(9).standard_normal((4, 3 * world.size)).astype(numpy.float32)
    label = numpy.array([1, 2, 3 * world.size + 5, 0])
    local = x[:, 3 * world.rank:3 * world.rank + 3]
    raised = False
    try:
        distributed.vocab_parallel_forward(local, label, 3 * world.rank, world.comm)
    except IndexError as exc:
        raised = 'label value {} at position (2,)'.format(3 * world.size + 5) in str(exc)
    assert world.count(raised) == world.size, 'IndexError on every rank'
    raised = False
    try:
        distributed.vocab_parallel_backward(None, local, numpy.zeros((4, 1), numpy.float32), label, 3 * world.rank,
                                            world.comm)
    except IndexError:
        raised = True
    assert world.count(raised) == world.size
    with cupy_sce.label_check(False):
        loss, grad = distributed.vocab_parallel_forward_backward(local, label, 3 * world.rank, world.comm)
    assert numpy.isnan(loss[2]).all() and numpy.isnan(grad[2]).all() and numpy.isfinite(loss[[0, 1, 3]]).all()


def main():
    world = MPIWorld() if sys.argv[1] == 'mpi' else TorchWorld()
    rng = numpy.random.default_rng(1234)  # the same problems on every rank
    cases = 0
    shapes = [((5, 23), -1), ((2, 19, 3), 1)]
    for (shape, axis), dtype, soft, features in itertools.product(shapes, (numpy.float32, numpy.float64),
                                                                  (False, True), FEATURES):
        for reduction in ('none', 'mean', 'sum'):
            check_case(world, rng, shape, axis, dtype, soft, features, reduction)
            cases += 1
    check_confident_prediction(world)
    check_bad_label(world)
    if world.rank == 0:
        print('ok', cases + 2, 'cases on', world.size, 'ranks', flush=True)
    if hasattr(world, 'close'):
        world.close()


if __name__ == '__main__':
    main()
