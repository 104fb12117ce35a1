"""Problems for the loss-family tests (test_family, test_reference): logits or probabilities of
any dtype, hard or soft labels, class weights."""
import numpy


def rows_shape(shape, axis):
    s = list(shape)
    s[axis] = 1
    return tuple(s)


def make_weight(rng, K, dtype=numpy.float32, zero_some=False):
    """Class weights that every float dtype holds exactly (multiples of 1/8 in [1/8, 3])."""
    w = rng.integers(1, 25, K) / 8.0
    if zero_some and K > 1:
        w[rng.integers(0, K)] = 0.0
    return w.astype(dtype)


def make_case(rng, shape, axis, *, dtype=numpy.float32, soft=False, ignore_index=-100, ignore_fraction=0.2,
              squeeze_label=False, label_dtype=numpy.int64, probabilities=False, scale=3.0,
              unnormalized=False):
    """Logits (or probabilities) of ``dtype`` and a label; soft labels are float32 for float16."""
    K = shape[axis]
    z = rng.standard_normal(shape) * (1.0 if probabilities else scale)
    if probabilities:
        e = numpy.exp(z - z.max(axis=axis, keepdims=True))
        z = e / e.sum(axis=axis, keepdims=True)
    x = z.astype(dtype)
    if soft:
        label = rng.random(shape) + 0.01
        label /= label.sum(axis=axis, keepdims=True)
        if unnormalized:
            label *= rng.uniform(0.5, 2.0, rows_shape(shape, axis))
        return x, label.astype(numpy.float32 if dtype == numpy.float16 else dtype)
    lshape = rows_shape(shape, axis)
    label = rng.integers(0, K, size=lshape)
    label[rng.random(lshape) < ignore_fraction] = ignore_index
    if squeeze_label:
        label = numpy.squeeze(label, axis)
    return x, label.astype(label_dtype)
