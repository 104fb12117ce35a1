"""What the framework bridges (``torch.py``, ``paddle.py``) share."""
import contextlib


@contextlib.contextmanager
def cupy_stream(device_id, stream_handle, allocator=None):
    """Run the CuPy work inside on the framework's current CUDA stream (``stream_handle``, a
    ``cudaStream_t`` as an int) of device ``device_id``, and with ``allocator`` (a CuPy allocator:
    size -> MemoryPointer) the framework's memory; nothing to do for CPU tensors (``device_id``
    None)."""
    if device_id is None:
        yield
        return
    import cupy
    with contextlib.ExitStack() as stack:
        stack.enter_context(cupy.cuda.Device(device_id))
        stack.enter_context(cupy.cuda.ExternalStream(stream_handle, device_id))
        if allocator is not None:
            stack.enter_context(cupy.cuda.using_allocator(allocator))
        yield
