"""cupy_sce: PaddlePaddle's softmax_with_cross_entropy, fused, on NumPy and CuPy arrays."""
from cupy_sce._api import (  # NOQA
    backward,
    compute_dtype,
    cross_entropy,
    forward,
    forward_backward,
    gather_label_logit,
    get_array_module,
    label_check,
    logsumexp,
    row_max,
    softmax_with_cross_entropy,
    softmax_with_cross_entropy_grad,
)
from cupy_sce._numpy_backend import (  # NOQA
    get_cpu_kernels,
    get_num_threads,
    release_scratch,
    set_cpu_kernels,
    set_num_threads,
)
from cupy_sce._output_cache import get_output_cache_limit, set_output_cache_limit  # NOQA

__version__ = '0.1.0'
