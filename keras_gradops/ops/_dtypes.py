"""Reduced-precision handling shared by the gradient ops.

Gradients in ``float16``/``bfloat16`` are reduced (sums, means, norms) in
``float32`` and cast back, so a sum of squares cannot overflow float16's
65504 or lose bfloat16's 8-bit mantissa.
"""

import tensorflow as tf

_LOW_PRECISION = (tf.float16, tf.bfloat16)


def to_float32(tensor):
    """Returns ``tensor`` as float32 if it is float16/bfloat16, else as is."""
    if tensor.dtype in _LOW_PRECISION:
        return tf.cast(tensor, tf.float32)
    return tensor


def values_of(gradient):
    """The dense values of a gradient: ``IndexedSlices.values`` or itself."""
    if isinstance(gradient, tf.IndexedSlices):
        return gradient.values
    return gradient


def map_values(gradient, fn):
    """Applies ``fn`` to a gradient's values, keeping ``IndexedSlices`` sparse."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(fn(gradient.values), gradient.indices, gradient.dense_shape)
    return fn(gradient)
