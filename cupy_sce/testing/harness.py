"""Execute cupy_sce's CUDA kernels on the CPU (test infrastructure).

The very ``.cu`` sources of ``cupy_sce/kernels`` are compiled with g++ (C++20)
together with ``cuda_host_shim.h`` (CUDA built-ins on fibers) and
``harness_main.cpp`` (scheduler, launch entry point, and a registry of every
instantiation in ``cupy_sce._kernels.name_expressions``).  ``launch`` mirrors
``cupy.RawKernel.__call__``: ``launch(name, grid, block, args, shared_mem=0)``
with NumPy arrays standing in for device arrays and NumPy scalars passed by
value.

``backend()`` returns the real ``CupyBackend`` driven by a runtime whose array
module is NumPy and whose kernels run here, so the backend's host logic
(kernel choice, launch geometry, argument packing, the label-range flag) is
exercised end to end::

    with cupy_sce._api.use_backend(harness.backend()):
        loss = cupy_sce.softmax_with_cross_entropy(numpy_logits, numpy_label)

Set ``CUPY_SCE_HARNESS_ASAN=1`` (and preload libasan, see ``asan_env()``) to
load the AddressSanitizer build instead.  Builds are cached by content hash
in ``CUPY_SCE_HARNESS_DIR`` (default: a folder in the temp directory).
"""
import ctypes
import functools
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import numpy

from cupy_sce import _cupy_backend, _dtypes, _kernels

HERE = os.path.dirname(os.path.abspath(__file__))
COMMON_FLAGS = ['-std=c++20', '-fPIC', '-shared', '-fno-extern-tls-init', '-Wall', '-Wno-unused-variable',
                '-Wno-unused-but-set-variable', '-Wno-unknown-pragmas']
FLAGS = {False: ['-O2'], True: ['-O1', '-g', '-fsanitize=address', '-fno-omit-frame-pointer']}
# CUPY_SCE_HARNESS_OPT (e.g. -O0) replaces -O2 of the plain build: the kernel mutants' probes, which
# build a library per mutant and run briefly, compile several times faster at -O0
OPT_ENV = 'CUPY_SCE_HARNESS_OPT'
# CUPY_SCE_HARNESS_DTYPES (comma-separated names, e.g. float16,float32,float64) limits the dtypes
# whose instantiations the libraries hold (a probe that needs no others builds less)
DTYPES_ENV = 'CUPY_SCE_HARNESS_DTYPES'
# bfloat16's instantiations too when ml_dtypes (its NumPy dtype) is installed
DTYPES = (numpy.float16, numpy.float32, numpy.float64) + (
    (_dtypes.bfloat16(),) if _dtypes.bfloat16_available() else ())
if os.environ.get(DTYPES_ENV):
    DTYPES = tuple(d for d in DTYPES if numpy.dtype(d).name in os.environ[DTYPES_ENV].split(','))


class HarnessError(RuntimeError):
    """A kernel misbehaved under the harness (deadlock, bad shuffle, bad launch, ...)."""


def _cccl_include_dir():
    """A directory holding <nv/target> (needed by cuda_fp16.h on the host)."""
    candidates = []
    try:
        import cupy
        candidates.append(os.path.join(os.path.dirname(cupy.__file__), '_core', 'include', 'cupy',
                                       '_cccl', 'libcudacxx'))
    except ImportError:
        pass
    for inc in _kernels.cuda_include_dirs():
        candidates += [inc, os.path.join(inc, 'cccl')]
    for c in candidates:
        if os.path.exists(os.path.join(c, 'nv', 'target')):
            return c
    return None


def include_dirs():
    dirs = [HERE, _kernels.KERNEL_DIR] + _kernels.cuda_include_dirs()
    cccl = _cccl_include_dir()
    if cccl:
        dirs.append(cccl)
    return dirs


def unavailable_reason():
    """Why the harness cannot be built here, or None."""
    if shutil.which(os.environ.get('CXX', 'g++')) is None:
        return 'no C++ compiler (g++) on PATH'
    if not _kernels.cuda_include_dirs():
        return 'cuda_fp16.h not found (install the test extra: nvidia-cuda-runtime, nvidia-cuda-crt)'
    if _cccl_include_dir() is None:
        return '<nv/target> not found (CuPy or the CUDA toolkit headers provide it)'
    return None


def registry_source(names=None):
    """One SCE_KERNEL line per instantiation (default: every one the backend can launch)."""
    if names is None:
        names = [n for dt in DTYPES for n in _kernels.name_expressions(dt)]
    return ''.join('SCE_KERNEL({})\n'.format(n) for n in names)


def build(asan=False, kernel_dir=None, source='sce.cu', names=None, options=()):
    """Compile the harness library for ``kernel_dir/source`` (cached by content); returns its path.

    Defaults: the package's kernels and every instantiation in ``name_expressions`` (tests build
    one ``library(key)`` per feature set instead).
    ``options``: extra ``-D`` flags, as NVRTC takes them (``_kernels.TUNING_KNOBS``).
    """
    reason = unavailable_reason()
    if reason:
        raise HarnessError(reason)
    kernel_dir = os.path.abspath(kernel_dir or _kernels.KERNEL_DIR)
    cxx = os.environ.get('CXX', 'g++')
    opt = FLAGS[asan] if asan or not os.environ.get(OPT_ENV) else [os.environ[OPT_ENV]]
    flags = COMMON_FLAGS + opt + ['-DSCE_HARNESS_SOURCE="{}"'.format(source)] + list(options)
    includes = [HERE, kernel_dir] + include_dirs()[2:]
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(kernel_dir, '*.cu*'))) + [
            os.path.join(HERE, 'cuda_host_shim.h'), os.path.join(HERE, 'harness_main.cpp')]:
        with open(path, 'rb') as f:
            digest.update(path.encode() + f.read())
    registry = registry_source(names)
    digest.update(registry.encode())
    digest.update(' '.join([cxx] + flags + includes).encode())
    root = os.environ.get('CUPY_SCE_HARNESS_DIR') or os.path.join(
        tempfile.gettempdir(), 'cupy_sce_harness_{}'.format(os.getuid()))
    out_dir = os.path.join(root, digest.hexdigest()[:16] + ('-asan' if asan else ''))
    lib = os.path.join(out_dir, 'libsce_harness.so')
    if os.path.exists(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'registry.inc'), 'w') as f:
        f.write(registry)
    tmp = lib + '.tmp{}'.format(os.getpid())
    cmd = [cxx] + flags + ['-I' + out_dir] + ['-I' + d for d in includes] + [
        os.path.join(HERE, 'harness_main.cpp'), '-o', tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise HarnessError('harness build failed:\n{}\n{}'.format(' '.join(cmd), result.stderr[-8000:]))
    os.replace(tmp, lib)
    return lib


def asan_env(env=None, log_dir=None):
    """Environment for a subprocess that loads the ASan build: libasan preloaded.

    ``log_dir``: ASan writes its reports there (asan.PID) -- a test runner that
    captures stderr loses them when ASan ends the process.
    """
    env = dict(os.environ if env is None else env)
    cxx = os.environ.get('CXX', 'g++')
    libasan = subprocess.run([cxx, '-print-file-name=libasan.so'], capture_output=True,
                             text=True).stdout.strip()
    env['LD_PRELOAD'] = libasan
    env['ASAN_OPTIONS'] = 'detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86' + (
        ':log_path=' + os.path.join(log_dir, 'asan') if log_dir else '')
    env['CUPY_SCE_HARNESS_ASAN'] = '1'
    return env


@functools.lru_cache(maxsize=None)
def load(path):
    """ctypes handle of a built harness library."""
    lib = ctypes.CDLL(path)
    lib.sce_harness_launch.restype = ctypes.c_int
    lib.sce_harness_launch.argtypes = [
        ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.c_size_t,
        ctypes.c_size_t, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t),
        ctypes.c_int,
        ctypes.c_ulonglong, ctypes.POINTER(ctypes.c_uint), ctypes.c_size_t, ctypes.c_char_p,
        ctypes.c_size_t]
    lib.sce_harness_kernel_name.restype = ctypes.c_char_p
    return lib


def library_key(name):
    """Which harness library holds the instantiation ``name``: its feature bits (0 for the
    featureless kernels and the building blocks).  One library per feature set, over all dtypes,
    built when a kernel of it is first launched: a run that uses no feature builds one."""
    key = _kernels.module_key(name)
    return key[1] if isinstance(key, tuple) else 0


def library_names(key, dtypes=DTYPES):
    return [n for dt in dtypes for n in _kernels.name_expressions(dt) if library_key(n) == key]


def library(key=0, names=None, options=()):
    """The library with feature set ``key``: the package's kernels, or CUPY_SCE_HARNESS_KERNEL_DIR's
    (mutation tests), built with ASan when CUPY_SCE_HARNESS_ASAN=1."""
    return load(_library_path(key, names, options))


def _library_path(key, names=None, options=()):
    return build(asan=os.environ.get('CUPY_SCE_HARNESS_ASAN') == '1',
                 kernel_dir=os.environ.get('CUPY_SCE_HARNESS_KERNEL_DIR'),
                 names=library_names(key) if names is None else names, options=options)


def prebuild(keys):
    """Build the libraries ``keys`` (as ``library`` would) with one g++ at a time per core: a test
    that launches every feature set waits for the builds about 1 / cores as long."""
    import concurrent.futures
    keys = list(keys)
    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(keys), len(os.sched_getaffinity(0))))) as pool:
        list(pool.map(_library_path, keys))


def kernel_names(key=0):
    """The instantiations compiled into the harness library ``key``."""
    lib = library(key)
    return [lib.sce_harness_kernel_name(i).decode() for i in range(lib.sce_harness_kernel_count())]


def layout_constants(acc_bytes=4):
    """(sizeof(RowState<A>), SCE_STATE_SLOTS, SCE_COLUMN_ROWS) as the compiled kernels see them."""
    lib = library()
    return (lib.sce_harness_state_bytes(acc_bytes), lib.sce_harness_state_slots(),
            lib.sce_harness_column_rows())


def is_asan():
    return bool(library().sce_harness_is_asan())


def _dims(value):
    dims = (value,) if isinstance(value, (int, numpy.integer)) else tuple(value)
    dims = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    return (ctypes.c_uint * 3)(*dims)


DEFAULT_SHARED_LIMIT = 48 * 1024  # dynamic shared memory without opt-in
OPTIN_SHARED_LIMIT = 227 * 1024   # the opt-in maximum of an H100 / H200


def launch(name, grid, block, args, shared_mem=0, seed=None, blocks=None, lib=None,
           max_shared=DEFAULT_SHARED_LIMIT, cluster=1):
    """Run kernel ``name`` on the CPU, like ``cupy.RawKernel(...)(grid, block, args, shared_mem=)``.

    ``args``: C-contiguous NumPy arrays (passed as pointers) and NumPy scalars
    (passed by value, with their own size, which must equal the parameter's).
    ``blocks``: run only these blockIdx.x values (default: the whole grid) --
    for index arithmetic at the far end of a huge grid.  ``lib``: a handle
    from ``load()`` (default: ``library()``).  ``max_shared``: the kernel's
    ``max_dynamic_shared_size_bytes`` (the opt-in).  ``cluster``: blocks per
    thread block cluster along x (what ``__cluster_dims__`` fixes on a GPU).
    """
    holders = []
    ptrs = (ctypes.c_void_p * max(len(args), 1))()
    sizes = (ctypes.c_size_t * max(len(args), 1))()
    for i, arg in enumerate(args):
        if isinstance(arg, numpy.ndarray):
            if not arg.flags.c_contiguous:
                raise HarnessError('{}: argument {} is a non-contiguous array'.format(name, i))
            holder = ctypes.c_void_p(arg.ctypes.data)
            sizes[i] = ctypes.sizeof(ctypes.c_void_p)
        elif isinstance(arg, numpy.generic):
            holder = ctypes.create_string_buffer(arg.tobytes(), arg.itemsize)
            sizes[i] = arg.itemsize
        else:
            raise HarnessError('{}: argument {} is a {}, not a NumPy array or scalar'.format(
                name, i, type(arg).__name__))
        holders.append(holder)
        ptrs[i] = ctypes.cast(ctypes.byref(holder), ctypes.c_void_p)
    if seed is None:
        seed = int(os.environ.get('CUPY_SCE_HARNESS_SEED', '12345'))
    only = (ctypes.c_uint * max(len(blocks or ()), 1))(*(blocks or ()))
    error = ctypes.create_string_buffer(4096)
    status = (lib or library(library_key(name))).sce_harness_launch(
        name.encode(), _dims(grid), _dims(block), int(shared_mem), int(max_shared), int(cluster), ptrs, sizes,
        len(args), seed,
        only, len(blocks or ()), error, len(error))
    if status:
        raise HarnessError(error.value.decode())


class _HarnessKernel:
    """Stands in for ``cupy.RawKernel``: the call, and the opt-in attribute for shared memory."""

    def __init__(self, name, lib):
        self.name = name
        self.lib = lib
        self.max_dynamic_shared_size_bytes = DEFAULT_SHARED_LIMIT

    def __call__(self, grid, block, args, shared_mem=0):
        launch(self.name, grid, block, args, shared_mem=shared_mem, lib=self.lib,
               max_shared=self.max_dynamic_shared_size_bytes, cluster=_kernels.cluster_size(self.name))


class HarnessRuntime:
    """The CuPy backend's runtime with NumPy arrays and kernels executed on the CPU.

    ``options`` (``-D`` flags) and ``dtypes`` build a library of their own, with only those
    dtypes' instantiations (a tuning knob's variant), or with ``names`` only those; by default the
    shared ``library()``.
    """
    xp = numpy

    def __init__(self, options=(), dtypes=None, names=None):
        self.launched = []  # kernel names, in order: tests check which variant ran
        self.kernels = {}
        self.dtypes = None if dtypes is None else [numpy.dtype(d) for d in dtypes]
        self.names = None if names is None else frozenset(names)
        self.options = tuple(options)
        self.libs = {}

    def kernel(self, dtype, name):
        if name not in _kernels.name_expressions(dtype):
            raise HarnessError('{} is not in _kernels.name_expressions({})'.format(name, _kernels.dtype_name(dtype)))
        if self.dtypes is not None and numpy.dtype(dtype) not in self.dtypes:
            raise HarnessError('this runtime was built for {} only, not {}'.format(
                self.dtypes, numpy.dtype(dtype)))
        self.launched.append(name)
        # one object per kernel, like RawModule.get_function: an opt-in set once stays set
        kernel = self.kernels.get(name)
        if kernel is None:
            key = library_key(name)
            if key not in self.libs:
                names = None if self.dtypes is None else library_names(key, self.dtypes)
                if self.names is not None:
                    names = [n for n in (names or library_names(key)) if n in self.names]
                self.libs[key] = library(key, names, self.options)
            kernel = self.kernels[name] = _HarnessKernel(name, self.libs[key])
        return kernel

    @staticmethod
    def limits():
        """(thread block clusters available, opt-in dynamic shared memory per block): an H100's."""
        return True, OPTIN_SHARED_LIMIT

    @staticmethod
    def address(array):
        return array.ctypes.data

    @staticmethod
    def read_scalar(array):
        return int(array[0])

    @staticmethod
    def bad_row_buffer():
        return numpy.full((1,), _cupy_backend.NO_BAD_ROW, dtype=numpy.uint64)


def backend():
    """A ``CupyBackend`` whose kernels run on the CPU (see module docstring)."""
    return _cupy_backend.CupyBackend(HarnessRuntime())


if __name__ == '__main__':  # python -m cupy_sce.testing.harness [--asan]: build, print the path
    print(build(asan='--asan' in sys.argv))
