"""PyTorch bridge: ``torch.nn.functional.cross_entropy`` on cupy_sce, with autograd.

    from cupy_sce.torch import cross_entropy          # instead of torch.nn.functional's
    loss = cross_entropy(logits, target)               # logits (N, C) or (N, C, d1, ...)
    loss.backward()

CPU tensors run on the NumPy backend through ``Tensor.numpy()`` views, CUDA tensors on the CuPy
backend through DLPack, on the tensor's device and ``torch.cuda.current_stream()``: no copies of
the logits either way.  float16, bfloat16, float32 and float64 logits; bfloat16 computes in
float32 and returns a bfloat16 loss and gradient.  ``Tensor.numpy()`` refuses bfloat16, so a CPU
bfloat16 tensor is read as its int16 view bit-cast to ``ml_dtypes.bfloat16``
(``tensor.view(torch.int16).numpy().view(bfloat16)``), and a bfloat16 result comes back the same
way round (``torch.from_numpy(a.view(int16)).view(torch.bfloat16)``): the same memory, no copy.
ml_dtypes is needed for bfloat16 only (a ``TypeError`` says so when it is missing); CUDA
bfloat16 tensors travel through DLPack as the others do.  With bfloat16 logits the weight (and
probability targets) are bfloat16 or float32; a float16 or float64 one is a ``TypeError``.

The forward keeps only the per-row log-sum-exp for the backward (not the softmax), and the
backward is one pass over the logits (``cupy_sce.backward``).

Semantics are PyTorch's (class dimension 1 for inputs of rank >= 2, dimension 0 for an
unbatched ``(C,)`` input; probability targets when ``target`` is floating), except where noted:

* ``reduction='mean'`` over rows that are all ``ignore_index`` (or whose weights sum to 0) is 0
  with gradient 0; PyTorch returns NaN.
* ``weight`` together with ``label_smoothing``, and ``weight`` with probability targets, are
  refused (``ValueError``): PyTorch weights each class's term there, cupy_sce (like Paddle) the
  row; the numbers would differ silently.
* ``z_loss`` (PaLM) and ``softcap`` (Gemma 2) are cupy_sce's additions (see the README).

This module imports torch; importing ``cupy_sce`` alone never does.
"""
import numpy
import torch

import cupy_sce
from cupy_sce import _bridge, _dtypes

_REDUCTIONS = ('none', 'mean', 'sum')


def _to_array(tensor):
    """The tensor's data as a NumPy (CPU) or CuPy (CUDA) array sharing its memory."""
    tensor = tensor.detach()
    if tensor.device.type == 'cpu':
        if tensor.dtype == torch.bfloat16:  # numpy() refuses it: the same bits as int16, bit-cast
            return tensor.view(torch.int16).numpy().view(_dtypes.bfloat16())
        return tensor.numpy()
    if tensor.device.type == 'cuda':
        import cupy
        return cupy.from_dlpack(tensor)
    raise TypeError('cupy_sce runs on CPU and CUDA tensors, got a tensor on {}'.format(tensor.device))


def _to_tensor(array, device):
    """A torch tensor sharing ``array``'s memory (None stays None)."""
    if array is None:
        return None
    if isinstance(array, (numpy.ndarray, numpy.generic)):
        array = numpy.asarray(array)
        if _dtypes.is_bfloat16(array.dtype):  # from_numpy refuses ml_dtypes' bfloat16: via int16
            return torch.from_numpy(array.view(numpy.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)
    return torch.from_dlpack(array).to(device)


def _torch_memory(size):
    """A CuPy allocator on PyTorch's caching allocator: device memory owned by a uint8 tensor of
    the current device and stream, freed to PyTorch when CuPy drops it.  Inside a CUDA graph
    capture PyTorch serves it from the graph's private pool; CuPy's own pool would call
    cudaMalloc there, which a capture forbids."""
    import cupy
    device = torch.device('cuda', cupy.cuda.runtime.getDevice())  # the tensor's (see _stream)
    owner = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
    memory = cupy.cuda.UnownedMemory(owner.data_ptr(), size, owner, owner.device.index)
    return cupy.cuda.MemoryPointer(memory, 0)


def _stream(tensor):
    """CuPy on PyTorch's current stream and memory of a CUDA tensor's device (nothing for CPU
    tensors)."""
    if tensor.device.type != 'cuda':
        return _bridge.cupy_stream(None, None)
    return _bridge.cupy_stream(tensor.device.index, torch.cuda.current_stream(tensor.device).cuda_stream,
                               _torch_memory)


def _check(input, target, weight, ignore_index, reduction, label_smoothing, inplace_backward):
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError('input and target must be torch tensors, got {} and {}'.format(
            type(input).__name__, type(target).__name__))
    if input.dim() < 1:
        raise ValueError('input must have rank >= 1 (classes on dimension 1, or 0 when unbatched), got a '
                         '0-d tensor')
    if reduction not in _REDUCTIONS:
        raise ValueError("reduction must be 'none', 'mean' or 'sum', got {!r}".format(reduction))
    if target.device != input.device:
        raise ValueError('target is on {} but input on {}'.format(target.device, input.device))
    soft = target.is_floating_point()
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError('weight must be a torch tensor, got {}'.format(type(weight).__name__))
        if label_smoothing:
            raise ValueError('weight with label_smoothing is refused: PyTorch weights each class term of the '
                             'smoothed target, cupy_sce weights the row (Paddle); use one of them, or '
                             'cupy_sce.cross_entropy for Paddle\'s semantics')
        if soft:
            raise ValueError('weight with probability targets is refused: PyTorch weights each class term, '
                             'cupy_sce weights the row (Paddle); use cupy_sce.cross_entropy for Paddle\'s '
                             'semantics')
    if not isinstance(inplace_backward, bool):
        raise TypeError('inplace_backward must be a bool, got {!r}'.format(inplace_backward))
    if inplace_backward and input.is_leaf and input.requires_grad:
        raise ValueError('inplace_backward=True would overwrite a leaf tensor that requires grad (its values '
                         'are what the optimizer updates); pass the logits computed from it instead')
    return soft


class _CrossEntropy(torch.autograd.Function):
    """Forward: the row losses and lse (saved); backward: the gradient from lse in one pass."""

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                inplace_backward, soft):
        axis = 1 if input.dim() >= 2 else 0
        # the DLPack exchanges too on PyTorch's stream: each side orders the other's work on its
        # own current stream, and CuPy's default (the legacy stream) would break a graph capture
        with _stream(input):
            x, label = _to_array(input), _to_array(target)
            w = None if weight is None else _to_array(weight)
            kw = dict(soft_label=soft, ignore_index=ignore_index, axis=axis, weight=w,
                      label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, reduction=reduction)
            loss, lse = cupy_sce.forward(x, label, **kw)
            lse_tensor = _to_tensor(lse, input.device)
            loss = _to_tensor(loss, input.device)
        ctx.kw = kw
        ctx.inplace_backward = inplace_backward
        ctx.save_for_backward(input, target, weight, lse_tensor)
        if reduction == 'none':  # PyTorch's shape: the input's without the class dimension
            loss = loss.reshape(input.shape[:axis] + input.shape[axis + 1:])
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        input, target, weight, lse = ctx.saved_tensors
        kw = dict(ctx.kw)
        axis = kw['axis']
        if kw['reduction'] == 'none':
            g = grad_output.reshape(input.shape[:axis] + (1,) + input.shape[axis + 1:])
        else:
            g = grad_output.reshape(())
        g = g.to(lse.dtype).contiguous()
        with _stream(input):
            kw['weight'] = None if weight is None else _to_array(weight)
            x, label, g = _to_array(input), _to_array(target), _to_array(g)
            if ctx.inplace_backward:
                grad = cupy_sce.backward(g, x, _to_array(lse), label, out=x, **kw)
            else:
                grad = cupy_sce.backward(g, x, _to_array(lse), label, **kw)
            grad_input = None if ctx.inplace_backward else _to_tensor(grad, input.device)
        if ctx.inplace_backward:
            # the logits now hold their gradient: a node that saved them must fail, not read it
            torch.autograd.graph.increment_version(input)
            grad_input = input.detach()
        return grad_input, None, None, None, None, None, None, None, None, None


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction='mean', label_smoothing=0.0, *,
                  z_loss=0.0, softcap=None, inplace_backward=False):
    """``torch.nn.functional.cross_entropy`` on cupy_sce's fused kernels (see the module docstring
    for the deviations).  ``inplace_backward=True`` writes the gradient into the logits' storage
    (no gradient buffer: the logits are destroyed by the backward)."""
    soft = _check(input, target, weight, ignore_index, reduction, label_smoothing, inplace_backward)
    if not input.requires_grad:  # no graph to build: the array call alone
        with torch.no_grad():
            return _CrossEntropy.forward(_NoContext(), input, target, weight, ignore_index, reduction,
                                         float(label_smoothing), float(z_loss), softcap, inplace_backward, soft)
    return _CrossEntropy.apply(input, target, weight, ignore_index, reduction, float(label_smoothing),
                               float(z_loss), softcap, inplace_backward, soft)


class _NoContext:
    """Stands in for autograd's ctx when no graph is built."""

    def save_for_backward(self, *tensors):
        pass


class CrossEntropyLoss(torch.nn.Module):
    """``torch.nn.CrossEntropyLoss`` on cupy_sce (see :func:`cross_entropy`)."""

    def __init__(self, weight=None, ignore_index=-100, reduction='mean', label_smoothing=0.0, *, z_loss=0.0,
                 softcap=None, inplace_backward=False):
        super().__init__()
        self.register_buffer('weight', weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
                             z_loss=self.z_loss, softcap=self.softcap, inplace_backward=self.inplace_backward)
