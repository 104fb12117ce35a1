"""The PyTorch bridge (cupy_sce.torch) against torch.nn.functional.cross_entropy, with real PyTorch."""
import numpy
import pytest

torch = pytest.importorskip('torch')
F = torch.nn.functional
from cupy_sce import torch as sce_torch  # noqa: E402  (after the skip: the bridge imports torch)
from helpers import traced_peak  # noqa: E402

REDUCTIONS = ('none', 'mean', 'sum')


def make(shape, dtype=torch.float64, soft=False, ignore_fraction=0.2, seed=0, requires_grad=True):
    """Logits of ``shape`` (classes on dim 1, or dim 0 for rank 1) and a target."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    C = shape[1] if len(shape) >= 2 else shape[0]
    if soft:
        t = torch.rand(shape, generator=g, dtype=torch.float64)
        t = (t / t.sum(dim=1 if len(shape) >= 2 else 0, keepdim=True)).to(dtype)
    else:
        tshape = shape[:1] + shape[2:] if len(shape) >= 2 else ()
        t = torch.randint(0, C, tshape, generator=g)
        if ignore_fraction and t.dim():
            t[torch.rand(tshape, generator=g) < ignore_fraction] = -100
    return x.requires_grad_(requires_grad), t


CASES = [((8, 13), False), ((5, 7, 3, 2), False), ((11,), False), ((6, 9), True), ((4, 5, 6), True)]


@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('shape,soft', CASES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_matches_torch_forward_and_gradient(shape, soft, reduction, dtype):
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for kw in ({}, dict(label_smoothing=0.1)) + (() if soft else (dict(weight=True),)):
        x, t = make(shape, dtype, soft)
        kw = dict(kw)
        if kw.pop('weight', False):
            kw['weight'] = torch.linspace(0.5, 2.0, shape[1] if len(shape) >= 2 else shape[0], dtype=dtype)
        ours = sce_torch.cross_entropy(x, t, reduction=reduction, **kw)
        x2 = x.detach().clone().requires_grad_(True)
        theirs = F.cross_entropy(x2, t, reduction=reduction, **kw)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, **tol)
        seed = torch.randn(ours.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
        (ours * seed).sum().backward()
        (theirs * seed).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, **tol)


@pytest.mark.parametrize('kw', [dict(), dict(label_smoothing=0.2), dict(weight=True), dict(z_loss=0.05),
                                dict(softcap=4.0), dict(z_loss=0.01, softcap=3.0, label_smoothing=0.1)])
@pytest.mark.parametrize('shape,soft', CASES)
def test_gradcheck_float64(shape, soft, kw):
    kw = dict(kw)
    if kw.pop('weight', False):
        if soft:
            return  # refused (see test_refused_combinations)
        kw['weight'] = torch.linspace(0.5, 2.0, shape[1] if len(shape) >= 2 else shape[0], dtype=torch.float64)
    for reduction in REDUCTIONS:
        x, t = make(shape, soft=soft, ignore_fraction=0.2)
        assert torch.autograd.gradcheck(lambda x: sce_torch.cross_entropy(x, t, reduction=reduction, **kw), (x,),
                                        eps=1e-6, atol=1e-6)


def test_refused_combinations_and_bad_input():
    x, t = make((4, 5))
    w = torch.ones(5, dtype=torch.float64)
    with pytest.raises(ValueError, match='weight with label_smoothing'):
        sce_torch.cross_entropy(x, t, weight=w, label_smoothing=0.1)
    xs, ts = make((4, 5), soft=True)
    with pytest.raises(ValueError, match='weight with probability targets'):
        sce_torch.cross_entropy(xs, ts, weight=w)
    with pytest.raises(ValueError, match="reduction must be"):
        sce_torch.cross_entropy(x, t, reduction='avg')
    with pytest.raises(ValueError, match='leaf tensor that requires grad'):
        sce_torch.cross_entropy(x, t, inplace_backward=True)
    with pytest.raises(IndexError, match='out of range'):
        sce_torch.cross_entropy(x, torch.tensor([0, 1, 7, 2]))
    with pytest.raises(TypeError, match='torch tensors'):
        sce_torch.cross_entropy(x.detach().numpy(), t)


def test_mean_over_ignored_rows_is_zero_not_nan():
    """The documented deviation: PyTorch returns NaN here."""
    x, _ = make((3, 4))
    t = torch.full((3,), -100)
    loss = sce_torch.cross_entropy(x, t)
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()
    assert torch.isnan(F.cross_entropy(x.detach(), t))


def test_no_copies_of_the_logits():
    """The forward keeps lse (N floats), not the softmax, and reads the logits through a view; the
    backward allocates the gradient only (and nothing with inplace_backward)."""
    h = torch.randn(2048, 64, dtype=torch.float32)
    w = torch.randn(64, 4000, dtype=torch.float32, requires_grad=True)
    t = torch.randint(0, 4000, (2048,))
    logits = h @ w
    sce_torch.cross_entropy(logits.detach(), t)  # the NumPy backend's per-thread scratch, kept
    loss, forward_extra = traced_peak(lambda: sce_torch.cross_entropy(logits, t))
    assert forward_extra < 2 ** 20, forward_extra  # lse and the row losses: 16 KiB, no N x K array
    ptr = logits.data_ptr()
    grads = []
    logits.register_hook(lambda g: grads.append(g))
    loss.backward()
    assert grads[0].data_ptr() != ptr and grads[0].shape == logits.shape
    # in place: the gradient is the logits' own storage
    logits = h @ w.detach().requires_grad_(True)
    expected = torch.autograd.grad(F.cross_entropy(logits, t), logits, retain_graph=True)[0]
    grads = []
    logits.register_hook(lambda g: grads.append(g))
    ptr = logits.data_ptr()
    sce_torch.cross_entropy(logits, t, inplace_backward=True).backward()
    assert grads[0].data_ptr() == ptr
    torch.testing.assert_close(grads[0], expected, rtol=1e-5, atol=1e-7)


def test_inplace_backward_is_refused_by_autograd_when_another_node_saved_the_logits():
    """A node that saved the logits and runs after the bridge's backward would read the gradient:
    autograd's version check refuses (the bridge bumps the logits' version when it writes)."""
    h = torch.randn(16, 8, dtype=torch.float64)
    w = torch.randn(8, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 10, (16,))
    logits = h @ w
    saved_first = (logits ** 2).sum()  # pow saves the logits; created first, its backward runs last
    loss = saved_first + sce_torch.cross_entropy(logits, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        loss.backward()


def test_inputs_unchanged_without_inplace_backward():
    x, t = make((6, 9))
    before = x.detach().clone()
    sce_torch.cross_entropy(x, t, label_smoothing=0.1, z_loss=0.01).backward()
    assert torch.equal(x.detach(), before)


def test_module_and_a_training_loop_follow_torch():
    """A linear classifier trained 50 SGD steps with the bridge follows the same loss curve as with
    torch.nn.functional.cross_entropy."""
    g = torch.Generator().manual_seed(3)
    data = torch.randn(256, 20, generator=g)
    labels = (data @ torch.randn(20, 5, generator=g)).argmax(dim=1)
    curves = []
    for loss_fn in (sce_torch.CrossEntropyLoss(label_smoothing=0.05), torch.nn.CrossEntropyLoss(label_smoothing=0.05)):
        torch.manual_seed(0)
        model = torch.nn.Linear(20, 5)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        curve = []
        for _ in range(50):
            opt.zero_grad()
            loss = loss_fn(model(data), labels)
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(curve)
    numpy.testing.assert_allclose(curves[0], curves[1], rtol=1e-4)
    assert curves[0][-1] < 0.5 * curves[0][0]  # it trains


def test_cuda_tensors_on_a_side_stream():
    """On a GPU: CUDA tensors, work queued on a non-default torch stream, same numbers as torch."""
    if not torch.cuda.is_available():
        pytest.skip('no CUDA device for torch')
    pytest.importorskip('cupy')
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x, t = make((64, 1000), torch.float32)
        x = x.detach().cuda().requires_grad_(True)
        t = t.cuda()
        ours = sce_torch.cross_entropy(x, t)
        ours.backward()
        x2 = x.detach().clone().requires_grad_(True)
        theirs = F.cross_entropy(x2, t)
        theirs.backward()
    stream.synchronize()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_float16_tensors():
    x, t = make((6, 50), torch.float16, requires_grad=True)
    loss = sce_torch.cross_entropy(x, t)
    loss.backward()
    x32 = x.detach().float().requires_grad_(True)
    ref = F.cross_entropy(x32, t)
    ref.backward()
    assert loss.dtype == torch.float16 and x.grad.dtype == torch.float16
    torch.testing.assert_close(loss.float(), ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(x.grad.float(), x32.grad, rtol=2e-3, atol=2e-4)


BF16_TOL = dict(rtol=8e-3, atol=1e-6)  # about one bfloat16 ulp (the results are rounded once to bfloat16)


@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('case', ['hard', 'weight-bf16', 'weight-f32', 'soft'])
def test_bfloat16_tensors(case, reduction):
    """bfloat16 logits compute in float32: the loss and gradient are bfloat16, and match
    torch's float32 cross_entropy of the same bfloat16 values within about one bfloat16 ulp."""
    x, t = make((6, 50), torch.bfloat16, soft=case == 'soft')
    kw = dict(reduction=reduction)
    if case.startswith('weight'):
        w_dtype = torch.bfloat16 if case == 'weight-bf16' else torch.float32
        kw['weight'] = torch.linspace(0.5, 2.0, 50).to(w_dtype)
    loss = sce_torch.cross_entropy(x, t, **kw)
    seed = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
    (loss.float() * seed).sum().backward()
    x32 = x.detach().float().requires_grad_(True)
    if 'weight' in kw:
        kw['weight'] = kw['weight'].float()
    ref = F.cross_entropy(x32, t.float() if case == 'soft' else t, **kw)
    (ref * seed).sum().backward()
    assert loss.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and loss.shape == ref.shape
    torch.testing.assert_close(loss.float(), ref, **BF16_TOL)
    torch.testing.assert_close(x.grad.float(), x32.grad, **BF16_TOL)


def test_bfloat16_cpu_tensors_share_memory_and_inplace_backward():
    """A CPU bfloat16 tensor is read as its int16 view bit-cast to ml_dtypes.bfloat16 (no copy),
    results come back the same way, and inplace_backward writes the gradient into the logits."""
    ml_dtypes = pytest.importorskip('ml_dtypes')
    x, t = make((4, 7), torch.bfloat16, requires_grad=False)
    a = sce_torch._to_array(x)
    assert a.dtype == ml_dtypes.bfloat16 and a.ctypes.data == x.data_ptr()
    a[0, 0] = 2.5  # written through the array, read in the tensor
    assert x[0, 0].item() == 2.5
    back = sce_torch._to_tensor(a, x.device)
    assert back.dtype == torch.bfloat16 and back.data_ptr() == x.data_ptr()
    assert sce_torch._to_tensor(numpy.asarray(1.5, ml_dtypes.bfloat16), x.device).dtype == torch.bfloat16
    # in place: the gradient is the logits' own (bfloat16) storage
    h = torch.randn(16, 8, generator=torch.Generator().manual_seed(2)).bfloat16()
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(3)).bfloat16().requires_grad_(True)
    t = torch.randint(0, 40, (16,), generator=torch.Generator().manual_seed(4))
    logits = h @ w
    x32 = logits.detach().float().requires_grad_(True)
    F.cross_entropy(x32, t).backward()
    grads = []
    logits.register_hook(lambda g: grads.append(g))
    ptr = logits.data_ptr()
    sce_torch.cross_entropy(logits, t, inplace_backward=True).backward()
    assert grads[0].data_ptr() == ptr and grads[0].dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(grads[0].float(), x32.grad, **BF16_TOL)


def test_bfloat16_beside_float16_or_float64_is_refused():
    x, t = make((4, 7), torch.float16)
    with pytest.raises(TypeError, match='weight is bfloat16 but logits is float16'):
        sce_torch.cross_entropy(x, t, weight=torch.ones(7, dtype=torch.bfloat16))
    xb = x.detach().bfloat16().requires_grad_(True)
    with pytest.raises(TypeError, match='logits is bfloat16 but weight is float64'):
        sce_torch.cross_entropy(xb, t, weight=torch.ones(7, dtype=torch.float64))


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip('no CUDA device for torch')
    return pytest.importorskip('cupy')


def test_cuda_graph_capture_without_a_host_sync():
    """On a GPU: with the label check off nothing is read back, so a forward+backward can be
    captured in a CUDA graph (a host synchronisation inside a capture is an error) and replayed."""
    _cuda_or_skip()
    import cupy_sce
    x, t = make((64, 1000), torch.float32)
    static_x = x.detach().cuda().requires_grad_(True)
    static_t = t.clamp(min=0).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with cupy_sce.label_check(False), torch.cuda.stream(side):
        for _ in range(2):  # warm-up (compilation, allocator) outside the capture
            static_x.grad = None
            sce_torch.cross_entropy(static_x, static_t).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with cupy_sce.label_check(False), torch.cuda.graph(graph):
        static_x.grad = None
        static_loss = sce_torch.cross_entropy(static_x, static_t)
        static_loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    ref_x = static_x.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(ref_x, static_t)
    ref.backward()
    torch.testing.assert_close(static_loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(static_x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
