"""Cosine similarity between a guessed and the true gradient, overall and per layer."""

import tensorflow as tf

from keras_gradops.ops import global_norm
from keras_gradops.ops._dtypes import to_float32


def cosine_similarity(guessed, exact):
    """``<g_hat, g> / (||g_hat|| ||g||)`` over every entry of two gradient lists.

    Pairs where either entry is ``None`` are skipped; 0 if a norm is 0.

    Args:
        guessed: list of tensors or ``None``.
        exact: list aligned with ``guessed``.

    Returns:
        A float32 scalar in ``[-1, 1]``.

    Example:
        >>> round(float(cosine_similarity([tf.constant([1.0, 0.0])], [tf.constant([1.0, 1.0])])), 4)
        0.7071
    """
    pairs = [(to_float32(a), to_float32(b)) for a, b in zip(guessed, exact) if a is not None and b is not None]
    if not pairs:
        return tf.constant(0.0)
    dot = tf.cast(tf.add_n([tf.reduce_sum(a * b) for a, b in pairs]), tf.float32)
    denominator = global_norm([a for a, _ in pairs]) * global_norm([b for _, b in pairs])
    return tf.where(denominator > 0, dot / tf.maximum(denominator, 1e-30), 0.0)
