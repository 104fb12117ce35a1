"""The Paddle bridge (cupy_sce.paddle) against Paddle's own ops, with real Paddle."""
import warnings

import numpy
import pytest

paddle = pytest.importorskip('paddle')
from cupy_sce import paddle as sce_paddle  # noqa: E402  (after the skip: the bridge imports paddle)
from helpers import traced_peak  # noqa: E402

PF = paddle.nn.functional
TOL = {'float32': dict(rtol=2e-5, atol=2e-6), 'float64': dict(rtol=1e-10, atol=1e-12)}


@pytest.fixture(autouse=True)
def _quiet_deprecations():
    with warnings.catch_warnings():  # Paddle warns that softmax_with_cross_entropy is deprecated
        warnings.simplefilter('ignore')
        yield


def make(shape, axis, dtype='float32', soft=False, ignore=None, seed=0, squeeze=False):
    rng = numpy.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    if soft:
        t = rng.random(shape)
        t = (t / t.sum(axis=axis, keepdims=True)).astype(dtype)  # rows sum to 1: Paddle's gradient holds
    else:
        lshape = list(shape)
        lshape[axis] = 1
        t = rng.integers(0, shape[axis], lshape)
        if ignore is not None:
            t[rng.random(lshape) < 0.25] = ignore
        if squeeze:
            t = numpy.squeeze(t, axis)
    return paddle.to_tensor(x, stop_gradient=False), paddle.to_tensor(t)


def both(ours_fn, theirs_fn, x, *args, **kw):
    """(ours, theirs) losses and gradients of sum(loss * seed) w.r.t. x, as numpy."""
    results = []
    for fn in (ours_fn, theirs_fn):
        x.clear_gradient()
        loss = fn(x, *args, **kw)
        seed = paddle.to_tensor(numpy.random.default_rng(9).uniform(0.5, 1.5, loss.shape)).astype(loss.dtype)
        (loss * seed).sum().backward()
        results.append((loss.numpy(), x.grad.numpy().copy()))
    return results


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
@pytest.mark.parametrize('shape,axis,soft', [((8, 13), -1, False), ((5, 7, 3), 1, False), ((6, 9), -1, True),
                                             ((4, 5, 6), 0, True)])
def test_softmax_with_cross_entropy_matches_paddle(dtype, shape, axis, soft):
    x, t = make(shape, axis, dtype, soft, ignore=None if soft else 2)
    (loss, grad), (ref_loss, ref_grad) = both(sce_paddle.softmax_with_cross_entropy, PF.softmax_with_cross_entropy,
                                              x, t, soft_label=soft, ignore_index=2, axis=axis)
    assert loss.shape == ref_loss.shape
    numpy.testing.assert_allclose(loss, ref_loss, **TOL[dtype])
    numpy.testing.assert_allclose(grad, ref_grad, **TOL[dtype])
    loss, softmax = sce_paddle.softmax_with_cross_entropy(x, t, soft_label=soft, axis=axis, return_softmax=True)
    ref_loss, ref_softmax = PF.softmax_with_cross_entropy(x, t, soft_label=soft, axis=axis, return_softmax=True)
    numpy.testing.assert_allclose(softmax.numpy(), ref_softmax.numpy(), **TOL[dtype])
    assert softmax.stop_gradient


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
@pytest.mark.parametrize('reduction', ['none', 'mean', 'sum'])
@pytest.mark.parametrize('case', ['hard', 'hard-1d-label', 'weight', 'soft', 'smoothing', 'probabilities'])
def test_cross_entropy_matches_paddle(dtype, reduction, case):
    """Every reduction, class weights, soft labels, label smoothing and use_softmax=False, where
    the documented differences do not apply (ignore_index >= 0, no ignored rows with smoothing)."""
    kw = dict(reduction=reduction)
    if case == 'hard':
        x, t = make((10, 7), -1, dtype, ignore=3)
        kw['ignore_index'] = 3
    elif case == 'hard-1d-label':
        x, t = make((10, 7), -1, dtype, squeeze=True)
    elif case == 'weight':
        x, t = make((10, 7), -1, dtype, ignore=0)
        kw.update(ignore_index=0, weight=paddle.to_tensor(numpy.linspace(0.5, 2, 7).astype(dtype)))
    elif case == 'soft':
        x, t = make((10, 7), -1, dtype, soft=True)
        kw['soft_label'] = True
    elif case == 'smoothing':
        x, t = make((10, 7), -1, dtype, squeeze=True)
        kw['label_smoothing'] = 0.1
    else:
        z = numpy.random.default_rng(3).random((10, 7)) + 0.05
        x = paddle.to_tensor((z / z.sum(1, keepdims=True)).astype(dtype), stop_gradient=False)
        t = paddle.to_tensor(numpy.random.default_rng(4).integers(0, 7, (10,)))
        kw['use_softmax'] = False
    (loss, grad), (ref_loss, ref_grad) = both(sce_paddle.cross_entropy, PF.cross_entropy, x, t, **kw)
    assert loss.shape == ref_loss.shape, (loss.shape, ref_loss.shape)
    tol = TOL[dtype]
    if case == 'smoothing' and dtype == 'float64':
        tol = dict(rtol=1e-7, atol=1e-9)  # Paddle smooths with epsilon rounded to float32 (5.6e-9 relative)
    numpy.testing.assert_allclose(loss, ref_loss, **tol)
    numpy.testing.assert_allclose(grad, ref_grad, **tol)


def test_additions_z_loss_and_softcap_have_their_gradients():
    """z_loss and softcap (not in Paddle): the bridge's gradient is cupy_sce's (checked against
    finite differences in float64 here)."""
    x, t = make((6, 5), -1, 'float64', squeeze=True)
    kw = dict(z_loss=0.05, softcap=3.0, label_smoothing=0.1, reduction='sum')
    loss = sce_paddle.cross_entropy(x, t, **kw)
    loss.backward()
    grad = x.grad.numpy()
    base = x.numpy()
    numeric = numpy.zeros_like(base)
    for i in numpy.ndindex(base.shape):
        up, down = base.copy(), base.copy()
        up[i] += 1e-6
        down[i] -= 1e-6
        f = [float(sce_paddle.cross_entropy(paddle.to_tensor(v), t, **kw)) for v in (up, down)]
        numeric[i] = (f[0] - f[1]) / 2e-6
    numpy.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)


def test_no_copies_of_the_logits_and_inputs_unchanged():
    x, t = make((2048, 4000), -1, squeeze=True)
    before = x.numpy()
    sce_paddle.cross_entropy(x.detach(), t)  # the NumPy backend's per-thread scratch, kept
    loss, extra = traced_peak(lambda: sce_paddle.cross_entropy(x, t))
    assert extra < 2 ** 20, extra  # lse and the row losses; Paddle's numpy() would copy 32 MB
    loss.backward()
    numpy.testing.assert_array_equal(x.numpy(), before)


def test_bad_input_gets_clear_errors():
    x, t = make((4, 5), -1, squeeze=True)
    with pytest.raises(TypeError, match='label must be a paddle.Tensor'):
        sce_paddle.cross_entropy(x, t.numpy())
    with pytest.raises(IndexError, match='out of range'):
        sce_paddle.cross_entropy(x, paddle.to_tensor(numpy.array([0, 1, 9, 2])))


def test_a_training_loop_follows_paddle():
    """A linear classifier, 50 SGD steps, with the bridge and with Paddle's loss: the same curve."""
    rng = numpy.random.default_rng(5)
    data = paddle.to_tensor(rng.standard_normal((256, 20)).astype('float32'))
    labels = paddle.to_tensor((data.numpy() @ rng.standard_normal((20, 5))).argmax(1))
    curves = []
    for loss_fn in (sce_paddle.cross_entropy, PF.cross_entropy):
        paddle.seed(0)
        model = paddle.nn.Linear(20, 5)
        opt = paddle.optimizer.SGD(learning_rate=0.5, parameters=model.parameters())
        curve = []
        for _ in range(50):
            loss = loss_fn(model(data), labels)
            loss.backward()
            opt.step()
            opt.clear_grad()
            curve.append(float(loss))
        curves.append(curve)
    numpy.testing.assert_allclose(curves[0], curves[1], rtol=1e-4)
    assert curves[0][-1] < 0.5 * curves[0][0]


def test_float16_tensors():
    x, t = make((6, 50), -1, 'float16', squeeze=True)
    loss = sce_paddle.cross_entropy(x, t, reduction='sum')
    loss.backward()
    x32 = paddle.to_tensor(x.numpy().astype('float32'), stop_gradient=False)
    ref = PF.cross_entropy(x32, t, reduction='sum')
    ref.backward()
    assert loss.dtype == paddle.float16 and x.grad.dtype == paddle.float16
    numpy.testing.assert_allclose(float(loss), float(ref), rtol=2e-3)
    numpy.testing.assert_allclose(x.grad.numpy().astype('float32'), x32.grad.numpy(), rtol=2e-3, atol=2e-4)


BF16_TOL = dict(rtol=8e-3, atol=1e-6)  # about one bfloat16 ulp (the results are rounded once to bfloat16)


def make_bf16(shape, seed=0):
    """bfloat16 logits (Paddle on CPU casts to bfloat16, NumPy cannot without ml_dtypes) and labels
    with the class axis (last) squeezed, some of them 3, the ignore_index the tests pass (one >= 0:
    Paddle's mean over ignored rows is one of the documented differences)."""
    x, t = make(shape, -1, squeeze=True, ignore=3, seed=seed)
    x = x.detach().astype('bfloat16')
    x.stop_gradient = False
    return x, t


@pytest.mark.parametrize('reduction', ['none', 'mean', 'sum'])
@pytest.mark.parametrize('weight', [None, 'bfloat16', 'float32'])
def test_bfloat16_tensors(weight, reduction):
    """bfloat16 logits compute in float32: the loss and gradient are bfloat16, and match Paddle's
    float32 cross_entropy of the same bfloat16 values (Paddle has no CPU bfloat16 kernel) within
    about one bfloat16 ulp."""
    x, t = make_bf16((6, 50))
    kw = dict(reduction=reduction, ignore_index=3)
    if weight is not None:
        kw['weight'] = paddle.to_tensor(numpy.linspace(0.5, 2, 50).astype('float32')).astype(weight)
    loss = sce_paddle.cross_entropy(x, t, **kw)
    seed = paddle.to_tensor(numpy.linspace(0.5, 1.5, max(loss.size, 1)).astype('float32')).reshape(loss.shape)
    (loss.astype('float32') * seed).sum().backward()
    x32 = x.detach().astype('float32')
    x32.stop_gradient = False
    if weight is not None:
        kw['weight'] = kw['weight'].astype('float32')
    ref = PF.cross_entropy(x32, t, **kw)
    (ref * seed).sum().backward()
    assert loss.dtype == paddle.bfloat16 and x.grad.dtype == paddle.bfloat16 and loss.shape == ref.shape
    numpy.testing.assert_allclose(loss.astype('float32').numpy(), ref.numpy(), **BF16_TOL)
    numpy.testing.assert_allclose(x.grad.astype('float32').numpy(), x32.grad.numpy(), **BF16_TOL)


def test_bfloat16_softmax_with_cross_entropy():
    x, t = make_bf16((5, 9), seed=1)
    t = t.unsqueeze(-1)
    loss, softmax = sce_paddle.softmax_with_cross_entropy(x, t, ignore_index=3, return_softmax=True)
    loss.sum().backward()
    x32 = x.detach().astype('float32')
    x32.stop_gradient = False
    ref, ref_softmax = PF.softmax_with_cross_entropy(x32, t, ignore_index=3, return_softmax=True)
    ref.sum().backward()
    assert loss.dtype == softmax.dtype == x.grad.dtype == paddle.bfloat16
    numpy.testing.assert_allclose(loss.astype('float32').numpy(), ref.numpy(), **BF16_TOL)
    numpy.testing.assert_allclose(softmax.astype('float32').numpy(), ref_softmax.numpy(), **BF16_TOL)
    numpy.testing.assert_allclose(x.grad.astype('float32').numpy(), x32.grad.numpy(), **BF16_TOL)


def test_bfloat16_cpu_tensors_share_memory():
    """A CPU bfloat16 tensor is read through DLPack as its int16 view bit-cast to
    ml_dtypes.bfloat16 (no copy), and a bfloat16 array goes back the same way."""
    ml_dtypes = pytest.importorskip('ml_dtypes')
    x, _ = make_bf16((4, 7))
    a = sce_paddle._to_array(x)
    assert a.dtype == ml_dtypes.bfloat16 and a.ctypes.data == x.data_ptr()
    a[0, 0] = 2.5  # written through the array, read in the tensor
    assert float(x[0, 0].astype('float32')) == 2.5
    back = sce_paddle._to_tensor(a)
    assert back.dtype == paddle.bfloat16 and back.data_ptr() == x.data_ptr()
    scalar = sce_paddle._to_tensor(numpy.asarray(1.5, ml_dtypes.bfloat16))
    assert scalar.dtype == paddle.bfloat16 and scalar.shape == [] and float(scalar.astype('float32')) == 1.5


def test_bfloat16_beside_float16_or_float64_is_refused():
    x, t = make((4, 7), -1, 'float16', squeeze=True)
    with pytest.raises(TypeError, match='weight is bfloat16 but logits is float16'):
        sce_paddle.cross_entropy(x, t, weight=paddle.ones([7], dtype='bfloat16'))
    xb, t = make_bf16((4, 7))
    with pytest.raises(TypeError, match='logits is bfloat16 but weight is float64'):
        sce_paddle.cross_entropy(xb, t, weight=paddle.ones([7], dtype='float64'))


def test_gpu_tensors_on_paddles_stream():
    """On a GPU: Paddle GPU tensors run on the CuPy backend on Paddle's current stream, with
    Paddle's numbers."""
    if not paddle.device.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0:
        pytest.skip('no CUDA device for paddle')
    pytest.importorskip('cupy')
    with paddle.device.stream_guard(paddle.device.Stream()):
        x, t = make((64, 1000), -1, squeeze=True)
        x = x.cuda()
        x.stop_gradient = False
        t = t.cuda()
        (loss, grad), (ref_loss, ref_grad) = both(sce_paddle.cross_entropy, PF.cross_entropy, x, t)
    numpy.testing.assert_allclose(loss, ref_loss, **TOL['float32'])
    numpy.testing.assert_allclose(grad, ref_grad, **TOL['float32'])
