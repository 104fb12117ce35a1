"""CUDA sources, their template instantiations and their compilation.

The kernels live in ``cupy_sce/kernels/*.cu|*.cuh`` (package data, read with
``open()``).  ``name_expressions(dtype)`` is the one list of every
instantiation the backend can launch; the NVRTC compile test and the host
harness both use it, so a kernel the backend can ask for is a kernel that CI
compiles and executes.
"""
import os

import numpy

KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kernels')
MAIN_SOURCE = 'sce.cu'

# The logits' CUDA type by dtype name (bfloat16 is ml_dtypes', which this module need not import).
CUDA_TYPE = {'float16': '__half', 'bfloat16': '__nv_bfloat16', 'float32': 'float', 'float64': 'double'}
ITEMSIZE = {'float16': 2, 'bfloat16': 2, 'float32': 4, 'float64': 8}
LABEL_TYPE = {numpy.dtype(numpy.int32): 'int', numpy.dtype(numpy.int64): 'long long'}
ACC_TYPE = {'__half': 'float', '__nv_bfloat16': 'float', 'float': 'float', 'double': 'double'}


def dtype_name(dtype):
    """'float16', 'bfloat16', 'float32' or 'float64' for a dtype (or one of those names)."""
    return dtype if isinstance(dtype, str) else numpy.dtype(dtype).name


def cuda_type(dtype):
    return CUDA_TYPE[dtype_name(dtype)]


def vector_width(dtype):
    """Elements per 16-byte vector load for logits of ``dtype``."""
    return 16 // ITEMSIZE[dtype_name(dtype)]


# The operations of cupy_sce_rows (sce::Op in kernels/sce.cu), by the name the backends use.
OPS = {
    'lse': 'sce::OP_LSE',
    'forward': 'sce::OP_FORWARD',
    'forward_softmax': 'sce::OP_FORWARD_SOFTMAX',
    'forward_backward': 'sce::OP_FORWARD_BACKWARD',
    'backward_lse': 'sce::OP_BACKWARD_LSE',
    'backward_softmax': 'sce::OP_BACKWARD_SOFTMAX',
}
# Optional features (sce::Feature bits): a kernel variant per set, so that none is paid for unused.
F_WEIGHT, F_SMOOTH, F_ZLOSS, F_SOFTCAP = 1, 2, 4, 8
ALL_FEATURES = F_WEIGHT | F_SMOOTH | F_ZLOSS | F_SOFTCAP
# Operations that take the features (the others are Paddle's two ops and the lse building block).
FEATURE_OPS = ('forward', 'forward_backward', 'backward_lse')
# Operations whose pass 2 can read the row from pass 1's shared-memory cache.
CACHE_OPS = ('forward_softmax', 'forward_backward')


def feature_bits(weight=False, smoothing=False, z_loss=False, softcap=False):
    return ((F_WEIGHT if weight else 0) | (F_SMOOTH if smoothing else 0) | (F_ZLOSS if z_loss else 0)
            | (F_SOFTCAP if softcap else 0))


def _cacheable(op, label_type):
    return op in CACHE_OPS or (op == 'forward' and label_type in ACC_TYPE.values())


def rows_name(dtype, label_type, op, features, vec, cache_row=False):
    return 'cupy_sce_rows<{}, {}, {}, {}, {}, {}>'.format(
        cuda_type(dtype), label_type, OPS[op], int(features), vec, 'true' if cache_row else 'false')


CLUSTER_SIZES = (2, 4, 8)  # thread block clusters of cupy_sce_rows_cluster (8: the portable maximum)


def cluster_name(dtype, label_type, op, features, vec, cluster):
    return 'cupy_sce_rows_cluster<{}, {}, {}, {}, {}, {}>'.format(
        cuda_type(dtype), label_type, OPS[op], int(features), vec, cluster)


def _template_args(name):
    return [a.strip() for a in name[name.index('<') + 1:name.rindex('>')].split(',')]


def cluster_size(name):
    """CTAs per thread block cluster of the kernel ``name`` (1 for kernels without clusters)."""
    if not name.startswith('cupy_sce_rows_cluster<'):
        return 1
    return int(_template_args(name)[-1])


def module_key(name):
    """The lazily compiled module that holds ``name``: its (operation, features), or the kernel's
    own name for the building blocks.  One module per key and dtype."""
    if name.startswith('cupy_sce_rows'):
        args = _template_args(name)
        return args[2], int(args[3])
    return name[:name.index('<')]


def row_max_name(dtype, vec):
    return 'cupy_sce_row_max<{}, {}>'.format(cuda_type(dtype), vec)


def gather_name(dtype, label_type):
    return 'cupy_sce_gather_label<{}, {}>'.format(cuda_type(dtype), label_type)


def label_types(dtype):
    """Hard label types, then the soft label type (the accumulation type)."""
    return list(LABEL_TYPE.values()) + [ACC_TYPE[cuda_type(dtype)]]


def name_expressions(dtype):
    """Every instantiation the backend can launch for logits of ``dtype``: per operation, label
    type, feature set (FEATURE_OPS: all 16; the others none), VEC (1 and 16 bytes) and row cache;
    the cluster kernels for the featureless ops that cache; the building blocks."""
    vecs = (1, vector_width(dtype))
    names = []
    for op in OPS:
        for lt in (['int'] if op == 'lse' else label_types(dtype)):
            caches = (False, True) if _cacheable(op, lt) else (False,)
            for features in (range(ALL_FEATURES + 1) if op in FEATURE_OPS else (0,)):
                names += [rows_name(dtype, lt, op, features, v, c) for v in vecs for c in caches]
    for op in OPS:
        for lt in label_types(dtype):
            if op != 'lse' and _cacheable(op, lt):
                names += [cluster_name(dtype, lt, op, 0, v, c) for v in vecs for c in CLUSTER_SIZES]
    names += [row_max_name(dtype, v) for v in vecs]
    names += [gather_name(dtype, lt) for lt in LABEL_TYPE.values()]
    return names


def modules(dtype):
    """``name_expressions(dtype)`` grouped by ``module_key``: {key: [names]}, in list order."""
    groups = {}
    for name in name_expressions(dtype):
        groups.setdefault(module_key(name), []).append(name)
    return groups


def read_source(name=MAIN_SOURCE):
    with open(os.path.join(KERNEL_DIR, name)) as f:
        return f.read()


def cuda_include_dirs():
    """Directories with cuda_fp16.h and what it includes, from the pip CUDA packages if present."""
    dirs = []
    try:
        import nvidia
        for base in nvidia.__path__:
            for sub in ('cu13', 'cuda_runtime'):
                inc = os.path.join(base, sub, 'include')
                if os.path.exists(os.path.join(inc, 'cuda_fp16.h')):
                    dirs.append(inc)
    except ImportError:
        pass
    cuda_path = os.environ.get('CUDA_PATH', '/usr/local/cuda')
    if os.path.exists(os.path.join(cuda_path, 'include', 'cuda_fp16.h')):
        dirs.append(os.path.join(cuda_path, 'include'))
    return dirs


def nvrtc_options():
    """The options the backend compiles with (the NVRTC test uses the same)."""
    return ('--std=c++17', '-I' + KERNEL_DIR) + tuple('-I' + d for d in cuda_include_dirs())


# The compile-time knobs of kernels/sce.cu that scripts/tune_gpu.py measures against the
# defaults on a GPU.  The tests compile each with NVRTC and run each on the host harness (where
# the ftz exp2 is plain exp2f: its asm is device-only), so a GPU session never meets a knob
# that does not build or computes something else.
TUNING_KNOBS = {
    'prefetch': ('-DSCE_PREFETCH=1',),  # issue the next step's loads before this step's arithmetic
    'exp2 ftz': ('-DSCE_EXP2_FTZ=1',),  # ex2.approx.ftz: no subnormal fix-up
    'unroll 8': ('-DSCE_UNROLL=8',),    # 8 loads of 16 bytes in flight per thread, not 4
    'lean pass 1': ('-DSCE_LEAN_PASS1=1',),  # the label tested per chunk, a partial sum per chunk
    'stage short rows': ('-DSCE_STAGE_ROWS=1',),  # one-thread rows move through shared memory as one span
    'bulk copy': ('-DSCE_BULK_STAGE=1',),  # the row cache filled by the bulk copy engine (TMA, sm_90)
}


try:
    import cupy
except ImportError:  # pragma: no cover
    cupy = None

if cupy is not None:
    def raw_module(dtype, extra_options=(), names=None):
        """A ``cupy.RawModule`` with the instantiations ``names`` (default: every one for ``dtype``);
        ``extra_options``: e.g. the ``-D`` tuning knobs of kernels/sce.cu, as scripts/tune_gpu.py
        passes them."""
        return cupy.RawModule(code=read_source(), options=nvrtc_options() + tuple(extra_options),
                              name_expressions=list(names or name_expressions(dtype)))

    @cupy.memoize(for_each_device=True)
    def _module(dtype, key):
        return raw_module(dtype, names=modules(dtype)[key])

    def get_function(dtype, name):
        """The kernel ``name`` (one of ``name_expressions(dtype)``) on the current device; its module
        (see ``module_key``) is compiled on first use."""
        return _module(dtype_name(dtype), module_key(name)).get_function(name)


def nvrtc_compile(dtype, arch, extra_options=(), want_log=False, names=None, want_lowered=False):
    """Compile the instantiations ``names`` (default: every one for ``dtype``) with NVRTC for
    ``arch`` (e.g. 'compute_90').

    Needs no GPU.  Returns the PTX (compute_*) or the cubin (sm_*), and with
    ``want_log`` also the compiler log, with ``want_lowered`` also {name: mangled name}; raises
    ``RuntimeError`` with the log on error.
    """
    from cupy.cuda import nvrtc
    names = list(names or name_expressions(dtype))
    prog = nvrtc.createProgram(read_source(), MAIN_SOURCE, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, list(nvrtc_options()) + ['-arch=' + arch] + list(extra_options))
        except nvrtc.NVRTCError as exc:
            raise RuntimeError('NVRTC failed for {} ({}):\n{}'.format(
                arch, dtype_name(dtype), nvrtc.getProgramLog(prog))) from exc
        lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}  # raises if one is missing
        code = nvrtc.getCUBIN(prog) if arch.startswith('sm_') else nvrtc.getPTX(prog)
        result = (code,) + ((nvrtc.getProgramLog(prog),) if want_log else ()) + ((lowered,) if want_lowered else ())
        return result if len(result) > 1 else code
    finally:
        nvrtc.destroyProgram(prog)


def ptxas_usage(dtype, arch, names=None):
    """{instantiation name: (registers per thread, bytes of spill stores)} from ptxas (run by
    NVRTC for an sm_* arch)."""
    import re
    names = list(names or name_expressions(dtype))
    _, log, lowered = nvrtc_compile(dtype, arch, ('--ptxas-options=-v',), want_log=True, names=names,
                                    want_lowered=True)
    by_mangled = {mangled: name for name, mangled in lowered.items()}
    usage, entry, spilled = {}, None, 0
    for line in log.splitlines():
        found = re.search(r"Compiling entry function '(\w+)'", line)
        if found:
            entry, spilled = by_mangled.get(found.group(1), found.group(1)), 0
        found = re.search(r'(\d+) bytes spill stores', line)
        if found:
            spilled = int(found.group(1))
        found = re.search(r'Used (\d+) registers', line)
        if found and entry:
            usage[entry] = (int(found.group(1)), spilled)
    return usage

