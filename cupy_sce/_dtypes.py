"""The floating dtypes cupy_sce computes, bfloat16 among them.

bfloat16 is ``ml_dtypes.bfloat16``, the NumPy dtype that CuPy (>= 14), JAX and PyTorch's DLPack
exchange use.  ml_dtypes is imported the first time a bfloat16 dtype (or the string
``'bfloat16'``) is met, never at ``import cupy_sce``: the float16/32/64 paths work without it.
A bfloat16 array seen without ml_dtypes importable (NumPy names any registered bfloat16
``bfloat16``) is a ``TypeError`` that says to install it.

Every floating array of a bfloat16 call is bfloat16 or float32 (the compute dtype, into which
bfloat16 converts exactly): a float16 or float64 array beside bfloat16 would be rounded
silently, so it is an error (``check_float_mix``).
"""
import numpy

BFLOAT16 = 'bfloat16'
NO_ML_DTYPES = ('bfloat16 needs the ml_dtypes package (pip install ml_dtypes, or the "bf16" extra of '
                'cupy_sce); it is not importable here')
_NATIVE_FLOATS = (numpy.dtype(numpy.float16), numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))
_bfloat16 = []  # [dtype] once ml_dtypes imported


def bfloat16():
    """ml_dtypes' bfloat16 as a ``numpy.dtype``; ``TypeError`` when ml_dtypes is not installed."""
    if not _bfloat16:
        try:
            import ml_dtypes
        except ImportError as exc:
            raise TypeError(NO_ML_DTYPES) from exc
        _bfloat16.append(numpy.dtype(ml_dtypes.bfloat16))
    return _bfloat16[0]


def bfloat16_available():
    try:
        bfloat16()
    except TypeError:
        return False
    return True


def is_bfloat16(dtype):
    """Whether ``dtype`` is bfloat16: ml_dtypes' (a bfloat16 of another origin, or one seen
    without ml_dtypes, is a ``TypeError``)."""
    # kind first: numpy's dtype.name is a Python-level property, slow next to a small call
    if dtype.kind != 'V' or dtype.name != BFLOAT16:
        return False
    if dtype != bfloat16():
        raise TypeError('a bfloat16 dtype that is not ml_dtypes.bfloat16 ({!r}): cupy_sce computes '
                        'ml_dtypes.bfloat16 arrays'.format(dtype))
    return True


def is_float(dtype):
    """float16, bfloat16, float32 or float64 (any other 'f' kind, such as longdouble, too)."""
    return dtype.kind == 'f' or is_bfloat16(dtype)


def is_compute_float(dtype):
    """The logits' dtypes: float16, bfloat16, float32, float64."""
    return dtype in _NATIVE_FLOATS or is_bfloat16(dtype)


def as_dtype(value):
    """``numpy.dtype(value)``, which also knows the string 'bfloat16' (importing ml_dtypes)."""
    if isinstance(value, str) and value == BFLOAT16:
        return bfloat16()
    return numpy.dtype(value)


FLOAT_NAMES = 'float16, bfloat16, float32 or float64'


def check_float_mix(named_arrays):
    """With a bfloat16 array among ``named_arrays`` ((name, array or None) pairs), every floating
    one must be bfloat16 or float32: a float16 or float64 one would be rounded to another
    precision without a word."""
    floats = [(name, a.dtype) for name, a in named_arrays if a is not None and is_float(a.dtype)]
    bf16 = [name for name, dtype in floats if dtype.kind != 'f']  # the floats not of kind 'f': bfloat16
    if not bf16:
        return
    for name, dtype in floats:
        if dtype.kind == 'f' and dtype != numpy.float32:
            raise TypeError('{} is bfloat16 but {} is {}: a call with bfloat16 arrays takes its other floating '
                            'arrays in bfloat16 or float32 (the compute dtype); convert {} explicitly'.format(
                                bf16[0], name, dtype, name))
