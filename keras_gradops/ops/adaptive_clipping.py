"""Adaptive gradient clipping (AGC).

Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition
Without Normalization", ICML 2021 (arXiv:2102.06171), section 4.1.

Per output unit ``i``: if ``||G_i|| / max(||W_i||, eps) > clipping``, the
unit's gradient is scaled to norm ``clipping * max(||W_i||, eps)``; the
gradient norm is floored at ``1e-6`` in the division.
"""

import tensorflow as tf

from keras_gradops.arguments import check_positive
from keras_gradops.fan_in import resolve_fan_in_axes
from keras_gradops.ops._dtypes import to_float32, values_of

GRADIENT_NORM_FLOOR = 1e-6


def unitwise_norm(tensor, axes):
    """L2 norm per output unit over ``axes`` (keepdims); over all axes if empty."""
    values = to_float32(tensor)
    axes = list(axes) if axes else None
    return tf.sqrt(tf.reduce_sum(tf.square(values), axis=axes, keepdims=True))


def _agc_axes(variable, fan_in_axes):
    """Per-unit axes, or ``()`` (one unit) for rank <= 1 and weights without a fan-in."""
    if len(variable.shape) <= 1:
        return ()
    return resolve_fan_in_axes(variable, fan_in_axes) or ()


def adaptive_clip(gradients, variables, clipping=0.01, eps=1e-3, fan_in_axes=None):
    """Clips each output unit's gradient relative to the norm of its weights.

    ``G_i <- G_i * min(1, clipping * max(||W_i||, eps) / max(||G_i||, 1e-6))``
    per output unit ``i`` (fan-in axes as in :mod:`keras_gradops.fan_in`).
    Rank-0/1 variables and weights without a per-unit fan-in (biases, scales,
    ``None`` entries of ``fan_in_axes``) count as a single unit. A
    ``tf.IndexedSlices`` gradient (``Embedding``) is clipped as one unit
    against the whole variable's norm, and stays sparse.

    Args:
        gradients: list of tensors, ``tf.IndexedSlices`` or ``None``.
        variables: the variables, aligned with ``gradients``.
        clipping: positive float ``lambda``, the largest allowed ratio.
        eps: positive float, the floor on the weight norm (so zero-initialised
            weights can still move).
        fan_in_axes: optional ``{variable.path: axes}`` overrides.

    Returns:
        The list of clipped gradients.

    Example:
        >>> w = keras.Variable([[3.0], [4.0]])
        >>> g = adaptive_clip([tf.constant([[30.0], [40.0]])], [w], clipping=0.1)[0]
        >>> [round(x, 6) for x in g.numpy().ravel().tolist()]  # ||G|| = 50 > 0.1 * ||W|| = 0.5
        [0.3, 0.4]
    """
    check_positive(clipping, "clipping")
    check_positive(eps, "eps")
    if len(gradients) != len(variables):
        raise ValueError(
            f"`gradients` and `variables` must align one to one. Received "
            f"{len(gradients)} gradients and {len(variables)} variables."
        )
    return [
        None if g is None else clip_unitwise(g, v, _agc_axes(v, fan_in_axes), clipping, eps)
        for g, v in zip(gradients, variables)
    ]


def clip_unitwise(gradient, weight, axes, clipping, eps):
    """AGC of one tensor: ``G_i <- G_i * min(1, clipping * max(||W_i||, eps) / max(||G_i||, 1e-6))``.

    Args:
        gradient: a dense tensor or a ``tf.IndexedSlices`` (clipped as one
            unit against the whole weight's norm, and kept sparse).
        weight: the variable (or its value) the gradient belongs to.
        axes: the fan-in axes of one unit; ``()`` makes the whole tensor one unit.
        clipping, eps: as in :func:`adaptive_clip`.

    Returns:
        The clipped gradient, in its own dtype.
    """
    sparse = isinstance(gradient, tf.IndexedSlices)
    axes = () if sparse else tuple(axes)
    grad_values = values_of(gradient)
    max_norm = clipping * tf.maximum(unitwise_norm(tf.convert_to_tensor(weight), axes), eps)
    grad_norm = unitwise_norm(grad_values, axes)
    scale = tf.minimum(1.0, max_norm / tf.maximum(grad_norm, GRADIENT_NORM_FLOOR))
    if sparse:
        scale = tf.reshape(scale, [])
    new_values = tf.cast(to_float32(grad_values) * scale, grad_values.dtype)
    return tf.IndexedSlices(new_values, gradient.indices, gradient.dense_shape) if sparse else new_values
