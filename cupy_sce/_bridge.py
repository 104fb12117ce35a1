"""What the framework bridges (``torch.py``, ``paddle.py``) share."""
import contextlib


@contextlib.contextmanager
def cupy_stream(device_id, stream_handle):
    """Run the CuPy work inside on the framework's current CUDA stream (``stream_handle``, a
    ``cudaStream_t`` as an int) of device ``device_id``; nothing to do for CPU tensors
    (``device_id`` None)."""
    if device_id is None:
        yield
        return
    import cupy
    with cupy.cuda.Device(device_id), cupy.cuda.ExternalStream(stream_handle, device_id):
        yield
