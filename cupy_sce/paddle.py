"""Paddle bridge: Paddle's ``softmax_with_cross_entropy`` and ``cross_entropy`` on cupy_sce, with
autograd (``paddle.autograd.PyLayer``).

    from cupy_sce.paddle import softmax_with_cross_entropy   # instead of paddle.nn.functional's
    loss = softmax_with_cross_entropy(logits, label)
    loss.sum().backward()

The signatures and semantics are Paddle's, as cupy_sce's array functions have them (README,
"Differences from Paddle": the exact soft-label gradient, no clipping of ``x - max``, the mean
over non-ignored rows, smoothing with ignored rows).  CPU tensors run on the NumPy backend and GPU
tensors on the CuPy backend, both through DLPack (no copy of the logits; Paddle's ``numpy()``
copies), on Paddle's current CUDA stream.  The forward keeps the per-row lse for the backward,
which is one pass over the logits.  ``z_loss`` and ``softcap`` are cupy_sce's additions.

float16, bfloat16, float32 and float64 logits; bfloat16 computes in float32 and returns a
bfloat16 loss and gradient.  NumPy's DLPack import refuses bfloat16, so a CPU bfloat16 tensor is
read through DLPack as its int16 view (``tensor.view(paddle.int16)``, the same memory) bit-cast to
``ml_dtypes.bfloat16``, and a bfloat16 result goes back the same way round
(``paddle.from_dlpack(a.view(int16)).view(paddle.bfloat16)``): no copy either way.  ml_dtypes is
needed for bfloat16 only (a ``TypeError`` says so when it is missing); GPU bfloat16 tensors travel
through DLPack as the others do.  With bfloat16 logits the weight (and soft labels) are bfloat16
or float32; a float16 or float64 one is a ``TypeError``.

This module imports paddle; importing ``cupy_sce`` alone never does.
"""
import numpy
import paddle
from paddle.autograd import PyLayer

import cupy_sce
from cupy_sce import _bridge, _dtypes


def _to_array(tensor):
    """The tensor's data as a NumPy (CPU) or CuPy (GPU) array sharing its memory."""
    tensor = tensor.detach()
    if tensor.place.is_cpu_place():
        if tensor.dtype == paddle.bfloat16:  # NumPy's DLPack refuses it: the same bits as int16, bit-cast
            return numpy.from_dlpack(tensor.view(paddle.int16)).view(_dtypes.bfloat16())
        return numpy.from_dlpack(tensor)
    if tensor.place.is_gpu_place():
        import cupy
        return cupy.from_dlpack(tensor)
    raise TypeError('cupy_sce runs on CPU and GPU tensors, got a tensor on {}'.format(tensor.place))


def _to_tensor(array):
    """A Paddle tensor sharing ``array``'s memory (a 0-d array travels as shape (1,): no read back
    to the host, which on a GPU would synchronise)."""
    if array is None:
        return None
    if array.ndim == 0:
        return _to_tensor(array.reshape(1)).reshape([])
    if isinstance(array, numpy.ndarray) and _dtypes.is_bfloat16(array.dtype):
        # NumPy's DLPack export refuses ml_dtypes' bfloat16: the same memory as int16, bit-cast back
        return paddle.from_dlpack(array.view(numpy.int16)).view(paddle.bfloat16)
    return paddle.from_dlpack(array)


def _stream(tensor):
    """CuPy on Paddle's current stream of a GPU tensor's device (nothing for CPU tensors)."""
    if not tensor.place.is_gpu_place():
        return _bridge.cupy_stream(None, None)
    return _bridge.cupy_stream(tensor.place.gpu_device_id(), paddle.device.current_stream().cuda_stream)


class _Loss(PyLayer):
    """Forward: cupy_sce.forward (the row losses, lse saved); backward: cupy_sce.backward from lse.
    ``kw`` holds cupy_sce's keywords except the arrays; ``shape`` the loss's shape to return."""

    @staticmethod
    def forward(ctx, logits, label, weight, kw, shape):
        with _stream(logits):  # the DLPack exchanges too, on Paddle's stream
            x, lab = _to_array(logits), _to_array(label)
            w = None if weight is None else _to_array(weight)
            loss, lse = cupy_sce.forward(x, lab, weight=w, **kw)
            lse = None if lse is None else _to_tensor(lse)
            loss_shape, loss = loss.shape, _to_tensor(loss.reshape(shape))
        ctx.kw = kw
        ctx.has_weight = weight is not None
        ctx.loss_shape = loss_shape
        saved = [logits, label] + ([weight] if weight is not None else [])
        if lse is not None:
            saved.append(lse)
        ctx.save_for_backward(*saved)
        return loss

    @staticmethod
    def backward(ctx, loss_grad):
        saved = list(ctx.saved_tensor())
        logits, label = saved[0], saved[1]
        weight = saved[2] if ctx.has_weight else None
        lse = saved[-1] if ctx.kw['use_softmax'] else None
        with _stream(logits):
            x = _to_array(logits)
            g = _to_array(loss_grad.astype('float64' if x.dtype == numpy.float64 else 'float32'))
            g = g.reshape(ctx.loss_shape)
            grad = cupy_sce.backward(g, x, None if lse is None else _to_array(lse), _to_array(label),
                                     weight=None if weight is None else _to_array(weight), **ctx.kw)
            grads = [_to_tensor(grad), None]
        return tuple(grads + ([None] if ctx.has_weight else []))


def _check_tensor(name, value):
    if not isinstance(value, paddle.Tensor):
        raise TypeError('{} must be a paddle.Tensor, got {}'.format(name, type(value).__name__))


def softmax_with_cross_entropy(logits, label, soft_label=False, ignore_index=-100, numeric_stable_mode=True,
                               return_softmax=False, axis=-1):
    """``paddle.nn.functional.softmax_with_cross_entropy`` on cupy_sce (softmax, when returned,
    carries no gradient, as in Paddle)."""
    _check_tensor('logits', logits)
    _check_tensor('label', label)
    if return_softmax:
        with _stream(logits):
            x, lab = _to_array(logits), _to_array(label)
            _, softmax = cupy_sce.softmax_with_cross_entropy(x, lab, soft_label, ignore_index, numeric_stable_mode,
                                                             True, axis)
            softmax = _to_tensor(softmax)
        softmax.stop_gradient = True
    kw = dict(soft_label=soft_label, ignore_index=ignore_index, axis=axis, reduction='none', use_softmax=True)
    shape = list(logits.shape)
    shape[axis] = 1
    loss = _apply(logits, label, None, kw, tuple(shape))
    return (loss, softmax) if return_softmax else loss


def cross_entropy(input, label, weight=None, ignore_index=-100, reduction='mean', soft_label=False, axis=-1,
                  use_softmax=True, label_smoothing=0.0, name=None, *, z_loss=0.0, softcap=None):
    """``paddle.nn.functional.cross_entropy`` on cupy_sce, plus ``z_loss`` and ``softcap``."""
    _check_tensor('input', input)
    _check_tensor('label', label)
    if weight is not None:
        _check_tensor('weight', weight)
    kw = dict(soft_label=soft_label, ignore_index=ignore_index, axis=axis, reduction=reduction,
              use_softmax=use_softmax, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    if reduction != 'none':
        shape = ()
    elif soft_label or label_smoothing or label.ndim == input.ndim:
        # Paddle's shape: the input's with the class axis 1 (with smoothing it turns hard labels
        # into soft ones first, so a label without the class axis gets it back too)
        shape = list(input.shape)
        shape[axis] = 1
        shape = tuple(shape)
    else:
        shape = tuple(label.shape)
    return _apply(input, label, weight, kw, shape)


def _apply(logits, label, weight, kw, shape):
    if logits.stop_gradient:  # no graph: the array call alone
        with _stream(logits):
            x, lab = _to_array(logits), _to_array(label)
            w = None if weight is None else _to_array(weight)
            loss, _ = cupy_sce.forward(x, lab, weight=w, **kw)
            return _to_tensor(loss.reshape(shape))
    return _Loss.apply(logits, label, weight, kw, shape)
