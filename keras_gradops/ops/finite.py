"""Finiteness check over a gradient list."""

import tensorflow as tf

from keras_gradops.ops._dtypes import values_of


def all_finite(gradients):
    """``True`` iff no entry of any gradient is NaN or +-Inf (``None`` skipped).

    Example:
        >>> bool(all_finite([tf.constant([1.0]), None, tf.constant([float("nan")])]))
        False
    """
    checks = [tf.reduce_all(tf.math.is_finite(values_of(g))) for g in gradients if g is not None]
    if not checks:
        return tf.constant(True)
    return tf.reduce_all(tf.stack(checks))
